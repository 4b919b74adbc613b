//! Kubernetes defaulting: the fields kube-apiserver fills in when a client
//! leaves them out, so `kubectl get -o yaml` shows what people expect and
//! controllers can rely on them. Works on JSON values so unknown fields
//! survive; a field of the wrong type is left for validation to report.

use serde_json::{json, Map, Value};

use crate::registry::Resource;

/// Fills in the defaults of `obj`, an object of kind `res`. Idempotent:
/// defaulting twice gives the same object. Never panics, whatever the shape.
pub fn default_object(res: &Resource, obj: &mut Value) {
    let Some(o) = obj.as_object_mut() else {
        return;
    };
    match (res.group, res.kind) {
        ("", "Pod") => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                pod_spec(spec);
            }
            let qos = o.get("spec").map(qos_class).unwrap_or("BestEffort");
            let status = entry_obj(o, "status");
            if let Some(status) = status {
                set(status, "phase", json!("Pending"));
                set(status, "qosClass", json!(qos));
            }
        }
        ("apps", "Deployment") => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                set(spec, "replicas", json!(1));
                set(spec, "revisionHistoryLimit", json!(10));
                set(spec, "progressDeadlineSeconds", json!(600));
                if let Some(strategy) = entry_obj(spec, "strategy") {
                    set(strategy, "type", json!("RollingUpdate"));
                    if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                        if let Some(ru) = entry_obj(strategy, "rollingUpdate") {
                            set(ru, "maxUnavailable", json!("25%"));
                            set(ru, "maxSurge", json!("25%"));
                        }
                    }
                }
                template(spec);
            }
        }
        ("apps", "ReplicaSet") => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                set(spec, "replicas", json!(1));
                template(spec);
            }
        }
        ("", "Service") => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                service_spec(spec);
            }
        }
        ("", "Namespace") => {
            let name = o
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string);
            if let (Some(name), Some(meta)) = (name, entry_obj(o, "metadata")) {
                if let Some(labels) = entry_obj(meta, "labels") {
                    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            if let Some(spec) = entry_obj(o, "spec") {
                set(spec, "finalizers", json!(["kubernetes"]));
            }
            if let Some(status) = entry_obj(o, "status") {
                set(status, "phase", json!("Active"));
            }
        }
        ("", "Secret") => set(o, "type", json!("Opaque")),
        ("", "Endpoints") => {
            for subset in arr_objs(o, "subsets") {
                for port in arr_objs(subset, "ports") {
                    set(port, "protocol", json!("TCP"));
                }
            }
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            for port in arr_objs(o, "ports") {
                set(port, "protocol", json!("TCP"));
            }
        }
        ("", "Node") => {
            if let Some(status) = o.get_mut("status").and_then(Value::as_object_mut) {
                if let Some(daemon) = status
                    .get_mut("daemonEndpoints")
                    .and_then(|d| d.get_mut("kubeletEndpoint"))
                    .and_then(Value::as_object_mut)
                {
                    set(daemon, "Port", json!(0));
                }
            }
        }
        _ => {}
    }
}

/// Sets `key` unless it is present and not null.
fn set(o: &mut Map<String, Value>, key: &str, v: Value) {
    match o.get(key) {
        Some(Value::Null) | None => {
            o.insert(key.to_string(), v);
        }
        Some(_) => {}
    }
}

/// The object at `key`, created empty when absent or null. `None` when the
/// field holds something other than an object.
fn entry_obj<'a>(o: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    set(o, key, json!({}));
    o.get_mut(key).and_then(Value::as_object_mut)
}

/// The objects in the array at `key` (non-objects skipped).
fn arr_objs<'a>(
    o: &'a mut Map<String, Value>,
    key: &str,
) -> impl Iterator<Item = &'a mut Map<String, Value>> {
    o.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
}

fn template(spec: &mut Map<String, Value>) {
    if let Some(pod) = spec
        .get_mut("template")
        .and_then(|t| t.get_mut("spec"))
        .and_then(Value::as_object_mut)
    {
        pod_spec(pod);
    }
}

/// PodSpec defaults, shared by pods and pod templates.
pub fn pod_spec(spec: &mut Map<String, Value>) {
    set(spec, "restartPolicy", json!("Always"));
    set(spec, "dnsPolicy", json!("ClusterFirst"));
    set(spec, "schedulerName", json!("default-scheduler"));
    set(spec, "terminationGracePeriodSeconds", json!(30));
    set(spec, "securityContext", json!({}));
    set(spec, "enableServiceLinks", json!(true));
    set(spec, "priority", json!(0));
    if spec.get("serviceAccountName").is_none() {
        let sa = spec
            .get("serviceAccount")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        spec.insert("serviceAccountName".into(), json!(sa));
    }
    if let Some(sa) = spec.get("serviceAccountName").cloned() {
        set(spec, "serviceAccount", sa);
    }
    for key in ["containers", "initContainers"] {
        for c in arr_objs(spec, key) {
            container(c);
        }
    }
    for v in arr_objs(spec, "volumes") {
        volume(v);
    }
    // DefaultTolerationSeconds admission: pods ride out a short node outage.
    if let Some(tols) = spec
        .entry("tolerations")
        .or_insert_with(|| json!([]))
        .as_array_mut()
    {
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let present = tols.iter().any(|t| {
                t.get("key").and_then(Value::as_str) == Some(key)
                    || (t.get("operator").and_then(Value::as_str) == Some("Exists")
                        && t.get("key").is_none())
            });
            if !present {
                tols.push(json!({
                    "key": key,
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }));
            }
        }
    }
}

fn container(c: &mut Map<String, Value>) {
    set(c, "terminationMessagePath", json!("/dev/termination-log"));
    set(c, "terminationMessagePolicy", json!("File"));
    set(c, "resources", json!({}));
    let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
    set(c, "imagePullPolicy", json!(pull_policy(image)));
    for p in arr_objs(c, "ports") {
        set(p, "protocol", json!("TCP"));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
            set(p, "timeoutSeconds", json!(1));
            set(p, "periodSeconds", json!(10));
            set(p, "successThreshold", json!(1));
            set(p, "failureThreshold", json!(3));
            if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
                set(h, "path", json!("/"));
                set(h, "scheme", json!("HTTP"));
            }
        }
    }
    for hook in ["postStart", "preStop"] {
        if let Some(h) = c
            .get_mut("lifecycle")
            .and_then(|l| l.get_mut(hook))
            .and_then(|h| h.get_mut("httpGet"))
            .and_then(Value::as_object_mut)
        {
            set(h, "path", json!("/"));
            set(h, "scheme", json!("HTTP"));
        }
    }
    for e in arr_objs(c, "env") {
        if let Some(f) = e
            .get_mut("valueFrom")
            .and_then(|v| v.get_mut("fieldRef"))
            .and_then(Value::as_object_mut)
        {
            set(f, "apiVersion", json!("v1"));
        }
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise.
pub fn pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    // The tag is after the last ':' that follows the last '/', so a
    // registry port (`host:5000/img`) is not mistaken for one.
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn volume(v: &mut Map<String, Value>) {
    const SOURCES: &[&str] = &[
        "emptyDir",
        "hostPath",
        "secret",
        "configMap",
        "projected",
        "downwardAPI",
        "persistentVolumeClaim",
        "nfs",
        "csi",
        "ephemeral",
        "image",
        "iscsi",
        "rbd",
        "cephfs",
        "fc",
        "flexVolume",
        "azureDisk",
        "azureFile",
        "gcePersistentDisk",
        "awsElasticBlockStore",
        "gitRepo",
        "glusterfs",
        "portworxVolume",
        "quobyte",
        "scaleIO",
        "storageos",
        "vsphereVolume",
        "photonPersistentDisk",
        "flocker",
        "cinder",
    ];
    if !SOURCES.iter().any(|s| v.contains_key(*s)) {
        v.insert("emptyDir".into(), json!({}));
    }
    for src in ["secret", "configMap", "downwardAPI", "projected"] {
        if let Some(s) = v.get_mut(src).and_then(Value::as_object_mut) {
            set(s, "defaultMode", json!(420));
        }
    }
    if let Some(h) = v.get_mut("hostPath").and_then(Value::as_object_mut) {
        set(h, "type", json!(""));
    }
}

fn service_spec(spec: &mut Map<String, Value>) {
    set(spec, "type", json!("ClusterIP"));
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if ty != "ExternalName" {
        set(spec, "sessionAffinity", json!("None"));
        set(spec, "internalTrafficPolicy", json!("Cluster"));
        set(spec, "ipFamilyPolicy", json!("SingleStack"));
        set(spec, "ipFamilies", json!(["IPv4"]));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        set(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if ty == "LoadBalancer" {
        set(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if let Some(ip) = spec.get("clusterIP").cloned() {
        if ip.as_str().is_some_and(|s| !s.is_empty()) {
            set(spec, "clusterIPs", json!([ip]));
        }
    }
    for p in arr_objs(spec, "ports") {
        set(p, "protocol", json!("TCP"));
        if let Some(port) = p.get("port").cloned() {
            set(p, "targetPort", port);
        }
    }
}

/// The QoS class kube-apiserver records in `status.qosClass`.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let res = c.get("resources");
        let req = res
            .and_then(|r| r.get("requests"))
            .and_then(Value::as_object);
        let lim = res.and_then(|r| r.get("limits")).and_then(Value::as_object);
        if req.is_some_and(|m| !m.is_empty()) || lim.is_some_and(|m| !m.is_empty()) {
            any = true;
        }
        for r in ["cpu", "memory"] {
            let l = lim.and_then(|m| m.get(r));
            // A request left out defaults to the limit.
            let q = req.and_then(|m| m.get(r)).or(l);
            if l.is_none() || l != q {
                guaranteed = false;
            }
        }
    }
    if guaranteed {
        "Guaranteed"
    } else if any {
        "Burstable"
    } else {
        "BestEffort"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::by_kind;

    fn defaulted(api_version: &str, kind: &str, v: Value) -> Value {
        let res = by_kind(api_version, kind).expect("served kind");
        let mut v = v;
        default_object(res, &mut v);
        let mut again = v.clone();
        default_object(res, &mut again);
        assert_eq!(v, again, "defaulting must be idempotent");
        v
    }

    #[test]
    fn a_bare_pod_gets_kube_apiserver_defaults() {
        let p = defaulted(
            "v1",
            "Pod",
            json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"},
                   "spec":{"containers":[{"name":"c","image":"nginx","ports":[{"containerPort":80}],
                   "readinessProbe":{"httpGet":{"port":80}}}]}}),
        );
        let s = &p["spec"];
        assert_eq!(s["restartPolicy"], "Always");
        assert_eq!(s["dnsPolicy"], "ClusterFirst");
        assert_eq!(s["schedulerName"], "default-scheduler");
        assert_eq!(s["terminationGracePeriodSeconds"], 30);
        assert_eq!(s["securityContext"], json!({}));
        assert_eq!(s["serviceAccountName"], "default");
        let c = &s["containers"][0];
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(c["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(c["terminationMessagePolicy"], "File");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(c["readinessProbe"]["periodSeconds"], 10);
        assert_eq!(c["readinessProbe"]["failureThreshold"], 3);
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTP");
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["qosClass"], "BestEffort");
        assert_eq!(s["tolerations"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn pull_policy_follows_the_image_tag() {
        for (image, want) in [
            ("nginx", "Always"),
            ("nginx:latest", "Always"),
            ("nginx:1.27", "IfNotPresent"),
            ("localhost:5000/app", "Always"),
            ("localhost:5000/app:v1", "IfNotPresent"),
            ("busybox@sha256:abc", "IfNotPresent"),
            ("", "Always"),
        ] {
            assert_eq!(pull_policy(image), want, "{image}");
        }
    }

    #[test]
    fn explicit_values_are_never_overwritten() {
        let p = defaulted(
            "v1",
            "Pod",
            json!({"spec":{"restartPolicy":"Never","containers":[{"name":"c","image":"x:1","imagePullPolicy":"Never"}]}}),
        );
        assert_eq!(p["spec"]["restartPolicy"], "Never");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Never");
    }

    #[test]
    fn a_deployment_gets_replicas_strategy_and_template_defaults() {
        let d = defaulted(
            "apps/v1",
            "Deployment",
            json!({"spec":{"selector":{"matchLabels":{"a":"b"}},"template":{"metadata":{"labels":{"a":"b"}},
                   "spec":{"containers":[{"name":"c","image":"nginx:1"}]}}}}),
        );
        let s = &d["spec"];
        assert_eq!(s["replicas"], 1);
        assert_eq!(s["revisionHistoryLimit"], 10);
        assert_eq!(s["progressDeadlineSeconds"], 600);
        assert_eq!(s["strategy"]["type"], "RollingUpdate");
        assert_eq!(s["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(s["strategy"]["rollingUpdate"]["maxUnavailable"], "25%");
        assert_eq!(s["template"]["spec"]["restartPolicy"], "Always");
        assert_eq!(
            s["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
    }

    #[test]
    fn a_recreate_deployment_gets_no_rolling_update_parameters() {
        let d = defaulted(
            "apps/v1",
            "Deployment",
            json!({"spec":{"strategy":{"type":"Recreate"}}}),
        );
        assert!(d["spec"]["strategy"].get("rollingUpdate").is_none());
    }

    #[test]
    fn a_service_gets_cluster_ip_type_and_target_ports() {
        let s = defaulted(
            "v1",
            "Service",
            json!({"spec":{"selector":{"a":"b"},"ports":[{"port":80},{"port":53,"protocol":"UDP","targetPort":5353}]}}),
        );
        let spec = &s["spec"];
        assert_eq!(spec["type"], "ClusterIP");
        assert_eq!(spec["sessionAffinity"], "None");
        assert_eq!(spec["ports"][0]["protocol"], "TCP");
        assert_eq!(spec["ports"][0]["targetPort"], 80);
        assert_eq!(spec["ports"][1]["protocol"], "UDP");
        assert_eq!(spec["ports"][1]["targetPort"], 5353);
    }

    #[test]
    fn qos_class_is_guaranteed_only_when_limits_equal_requests() {
        let g = json!({"containers":[{"resources":{"limits":{"cpu":"1","memory":"1Gi"}}}]});
        let b = json!({"containers":[{"resources":{"requests":{"cpu":"1"}}}]});
        let e = json!({"containers":[{}]});
        assert_eq!(qos_class(&g), "Guaranteed");
        assert_eq!(qos_class(&b), "Burstable");
        assert_eq!(qos_class(&e), "BestEffort");
    }

    #[test]
    fn malformed_objects_are_left_alone_without_panicking() {
        for kind in crate::registry::RESOURCES {
            for v in [
                json!(null),
                json!([1]),
                json!({"spec": 3}),
                json!({"spec":{"containers":"x","template":[1],"ports":{"a":1}}}),
                json!({"metadata":"x","status":7}),
            ] {
                let mut v = v;
                default_object(kind, &mut v);
            }
        }
    }

    #[test]
    fn defaults_only_write_fields_the_schemas_declare() {
        let cases = [
            (
                "v1",
                "Pod",
                json!({"spec":{"containers":[{"name":"c","image":"x","ports":[{"containerPort":1}],
                "livenessProbe":{"httpGet":{"port":1}},"lifecycle":{"preStop":{"httpGet":{"port":1}}},
                "env":[{"name":"A","valueFrom":{"fieldRef":{"fieldPath":"metadata.name"}}}]}],
                "volumes":[{"name":"v"},{"name":"s","secret":{"secretName":"s"}},{"name":"h","hostPath":{"path":"/"}}]}}),
            ),
            (
                "apps/v1",
                "Deployment",
                json!({"spec":{"template":{"spec":{"containers":[{"name":"c","image":"x"}]}}}}),
            ),
            (
                "apps/v1",
                "ReplicaSet",
                json!({"spec":{"template":{"spec":{"containers":[{"name":"c","image":"x"}]}}}}),
            ),
            (
                "v1",
                "Service",
                json!({"spec":{"type":"LoadBalancer","clusterIP":"10.43.0.1","ports":[{"port":1}]}}),
            ),
            ("v1", "Namespace", json!({"metadata":{"name":"n"}})),
            ("v1", "Secret", json!({})),
            (
                "v1",
                "Endpoints",
                json!({"subsets":[{"ports":[{"port":1}]}]}),
            ),
            (
                "discovery.k8s.io/v1",
                "EndpointSlice",
                json!({"ports":[{"port":1}]}),
            ),
            (
                "v1",
                "Node",
                json!({"status":{"daemonEndpoints":{"kubeletEndpoint":{}}}}),
            ),
        ];
        for (av, kind, obj) in cases {
            let res = by_kind(av, kind).expect("served");
            let out = defaulted(av, kind, obj);
            assert_eq!(
                crate::validate::unknown_fields(res, &out),
                Vec::<String>::new(),
                "{kind}"
            );
        }
    }

    #[test]
    fn namespaces_and_secrets_get_their_defaults() {
        let n = defaulted("v1", "Namespace", json!({"metadata":{"name":"dev"}}));
        assert_eq!(
            n["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "dev"
        );
        assert_eq!(n["status"]["phase"], "Active");
        let s = defaulted("v1", "Secret", json!({"metadata":{"name":"s"}}));
        assert_eq!(s["type"], "Opaque");
    }
}
