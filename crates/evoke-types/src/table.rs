//! `kubectl get` output: meta.k8s.io/v1 Tables with the columns
//! kube-apiserver prints for each kind, so evoke's listing looks like a
//! real cluster's. Columns of priority 1 appear with `-o wide`.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::registry::Resource;

/// A Table of `objects` (all of kind `res`), ages measured against the
/// current time. See [`to_table_at`] to pass the time in.
pub fn to_table(res: &Resource, objects: &[Value], list_meta: Value) -> Value {
    to_table_at(res, objects, list_meta, Utc::now())
}

/// A Table of `objects` with ages measured against `now`. Rows carry the
/// object's metadata as a PartialObjectMetadata (`includeObject=Metadata`,
/// kubectl's default).
pub fn to_table_at(
    res: &Resource,
    objects: &[Value],
    list_meta: Value,
    now: DateTime<Utc>,
) -> Value {
    let columns = columns(res);
    let defs: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.ty,
                "format": if c.name == "Name" { "name" } else { "" },
                "description": c.description,
                "priority": c.priority,
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = columns.iter().map(|c| (c.cell)(o, now)).collect();
            json!({
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
                },
            })
        })
        .collect();
    let metadata = if list_meta.is_object() {
        list_meta
    } else {
        json!({})
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

type Cell = fn(&Value, DateTime<Utc>) -> Value;

struct Column {
    name: &'static str,
    ty: &'static str,
    priority: u8,
    description: &'static str,
    cell: Cell,
}

const fn col(
    name: &'static str,
    ty: &'static str,
    priority: u8,
    description: &'static str,
    cell: Cell,
) -> Column {
    Column {
        name,
        ty,
        priority,
        description,
        cell,
    }
}

const NAME: Column = col(
    "Name",
    "string",
    0,
    "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    |o, _| json!(s(o, &["metadata", "name"])),
);
const AGE: Column = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
    |o, now| json!(age(o.get("metadata").and_then(|m| m.get("creationTimestamp")), now)),
);

fn columns(res: &Resource) -> Vec<Column> {
    match (res.group, res.kind) {
        ("", "Pod") => vec![
            NAME,
            col("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic.", pod_ready),
            col("Status", "string", 0, "The aggregate status of the containers in this pod.", pod_status),
            col("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.", pod_restarts),
            AGE,
            col("IP", "string", 1, "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.", |o, _| {
                none_if_empty(s(o, &["status", "podIP"]))
            }),
            col("Node", "string", 1, "NodeName is a request to schedule this pod onto a specific node.", |o, _| {
                none_if_empty(s(o, &["spec", "nodeName"]))
            }),
            col("Nominated Node", "string", 1, "nominatedNodeName is set when this pod preempts other pods on the node.", |o, _| {
                none_if_empty(s(o, &["status", "nominatedNodeName"]))
            }),
            col("Readiness Gates", "string", 1, "If specified, all readiness gates will be evaluated for pod readiness.", pod_readiness_gates),
        ],
        ("apps", "Deployment") => vec![
            NAME,
            col("Ready", "string", 0, "Number of the pod with ready state", |o, _| {
                json!(format!("{}/{}", n(o, &["status", "readyReplicas"]), n(o, &["spec", "replicas"])))
            }),
            col("Up-to-date", "integer", 0, "Total number of non-terminated pods targeted by this deployment that have the desired template spec.", |o, _| {
                json!(n(o, &["status", "updatedReplicas"]))
            }),
            col("Available", "integer", 0, "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.", |o, _| {
                json!(n(o, &["status", "availableReplicas"]))
            }),
            AGE,
            col("Containers", "string", 1, "Names of each container in the template.", |o, _| template_containers(o, "name")),
            col("Images", "string", 1, "Images referenced by each container in the template.", |o, _| template_containers(o, "image")),
            col("Selector", "string", 1, "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.", |o, _| {
                json!(label_selector(o.get("spec").and_then(|s| s.get("selector"))))
            }),
        ],
        ("apps", "ReplicaSet") => vec![
            NAME,
            col("Desired", "integer", 0, "Replicas is the number of desired replicas.", |o, _| json!(n(o, &["spec", "replicas"]))),
            col("Current", "integer", 0, "Replicas is the most recently observed number of replicas.", |o, _| json!(n(o, &["status", "replicas"]))),
            col("Ready", "integer", 0, "The number of ready replicas for this replica set.", |o, _| json!(n(o, &["status", "readyReplicas"]))),
            AGE,
            col("Containers", "string", 1, "Names of each container in the template.", |o, _| template_containers(o, "name")),
            col("Images", "string", 1, "Images referenced by each container in the template.", |o, _| template_containers(o, "image")),
            col("Selector", "string", 1, "Selector is a label query over pods that should match the replica count.", |o, _| {
                json!(label_selector(o.get("spec").and_then(|s| s.get("selector"))))
            }),
        ],
        ("", "Service") => vec![
            NAME,
            col("Type", "string", 0, "type determines how the Service is exposed.", |o, _| json!(s(o, &["spec", "type"]))),
            col("Cluster-IP", "string", 0, "clusterIP is the IP address of the service and is usually assigned randomly.", |o, _| {
                none_if_empty(s(o, &["spec", "clusterIP"]))
            }),
            col("External-IP", "string", 0, "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.", service_external_ip),
            col("Port(s)", "string", 0, "The list of ports that are exposed by this service.", service_ports),
            AGE,
            col("Selector", "string", 1, "Route service traffic to pods with label keys and values matching this selector.", |o, _| {
                json!(map_selector(o.get("spec").and_then(|s| s.get("selector"))))
            }),
        ],
        ("", "Node") => vec![
            NAME,
            col("Status", "string", 0, "The status of the node", node_status),
            col("Roles", "string", 0, "The roles of the node", node_roles),
            AGE,
            col("Version", "string", 0, "Kubelet Version reported by the node.", |o, _| {
                json!(s(o, &["status", "nodeInfo", "kubeletVersion"]))
            }),
            col("Internal-IP", "string", 1, "List of addresses reachable to the node.", |o, _| node_address(o, "InternalIP")),
            col("External-IP", "string", 1, "List of addresses reachable to the node.", |o, _| node_address(o, "ExternalIP")),
            col("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).", |o, _| {
                unknown_if_empty(s(o, &["status", "nodeInfo", "osImage"]))
            }),
            col("Kernel-Version", "string", 1, "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).", |o, _| {
                unknown_if_empty(s(o, &["status", "nodeInfo", "kernelVersion"]))
            }),
            col("Container-Runtime", "string", 1, "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).", |o, _| {
                unknown_if_empty(s(o, &["status", "nodeInfo", "containerRuntimeVersion"]))
            }),
        ],
        ("", "Namespace") => vec![
            NAME,
            col("Status", "string", 0, "The status of the namespace", |o, _| json!(s(o, &["status", "phase"]))),
            AGE,
        ],
        ("", "Event") => vec![
            col("Last Seen", "string", 0, "Time when last event occurred", event_last_seen),
            col("Type", "string", 0, "Type of this event (Normal, Warning), new types could be added in the future.", |o, _| json!(s(o, &["type"]))),
            col("Reason", "string", 0, "This should be a short, machine understandable string that gives the reason for this event being generated.", |o, _| json!(s(o, &["reason"]))),
            col("Object", "string", 0, "The object that this event is about.", event_object),
            col("Subobject", "string", 1, "The subobject that this event is about.", |o, _| json!(s(o, &["involvedObject", "fieldPath"]))),
            col("Source", "string", 1, "The component reporting this event.", event_source),
            col("Message", "string", 0, "A human-readable description of the status of this operation.", |o, _| json!(s(o, &["message"]).trim())),
            col("First Seen", "string", 1, "The time at which the event was first recorded.", |o, now| {
                json!(age(o.get("firstTimestamp").or_else(|| o.get("eventTime")), now))
            }),
            col("Count", "string", 1, "The number of times this event has occurred.", |o, _| json!(n(o, &["count"]).max(1).to_string())),
            col("Name", "string", 1, "Name must be unique within a namespace.", |o, _| json!(s(o, &["metadata", "name"]))),
        ],
        ("", "ConfigMap") => vec![
            NAME,
            col("Data", "integer", 0, "Data contains the configuration data.", |o, _| json!(count(o, "data") + count(o, "binaryData"))),
            AGE,
        ],
        ("", "Secret") => vec![
            NAME,
            col("Type", "string", 0, "Used to facilitate programmatic handling of secret data.", |o, _| json!(s(o, &["type"]))),
            col("Data", "integer", 0, "Data contains the secret data.", |o, _| json!(count(o, "data"))),
            AGE,
        ],
        ("", "Endpoints") => vec![
            NAME,
            col("Endpoints", "string", 0, "Endpoints is the list of endpoints.", endpoints_list),
            AGE,
        ],
        ("discovery.k8s.io", "EndpointSlice") => vec![
            NAME,
            col("AddressType", "string", 0, "addressType specifies the type of address carried by this EndpointSlice.", |o, _| json!(s(o, &["addressType"]))),
            col("Ports", "string", 0, "ports specifies the list of network ports exposed by each endpoint in this slice.", slice_ports),
            col("Endpoints", "string", 0, "endpoints is a list of unique endpoints in this slice.", slice_endpoints),
            AGE,
        ],
        ("", "ServiceAccount") => vec![
            NAME,
            col("Secrets", "string", 0, "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.", |o, _| {
                json!(o.get("secrets").and_then(Value::as_array).map_or(0, Vec::len))
            }),
            AGE,
        ],
        ("node.k8s.io", "RuntimeClass") => vec![
            NAME,
            col("Handler", "string", 0, "Handler specifies the underlying runtime and configuration that the CRI implementation will use to handle pods of this class.", |o, _| json!(s(o, &["handler"]))),
            AGE,
        ],
        ("coordination.k8s.io", "Lease") => vec![
            NAME,
            col("Holder", "string", 0, "holderIdentity contains the identity of the holder of a current lease.", |o, _| json!(s(o, &["spec", "holderIdentity"]))),
            AGE,
        ],
        _ => vec![NAME, AGE],
    }
}

/// The string at `path`, or "".
fn s<'a>(o: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = o;
    for p in path {
        match cur.get(*p) {
            Some(v) => cur = v,
            None => return "",
        }
    }
    cur.as_str().unwrap_or_default()
}

/// The integer at `path`, or 0.
fn n(o: &Value, path: &[&str]) -> i64 {
    let mut cur = o;
    for p in path {
        match cur.get(*p) {
            Some(v) => cur = v,
            None => return 0,
        }
    }
    cur.as_i64().unwrap_or_default()
}

fn count(o: &Value, field: &str) -> usize {
    o.get(field)
        .and_then(Value::as_object)
        .map_or(0, |m| m.len())
}

fn none_if_empty(v: &str) -> Value {
    json!(if v.is_empty() { "<none>" } else { v })
}

fn unknown_if_empty(v: &str) -> Value {
    json!(if v.is_empty() { "<unknown>" } else { v })
}

/// The age of a timestamp as kubectl prints it, `<unknown>` without one.
fn age(ts: Option<&Value>, now: DateTime<Utc>) -> String {
    match ts
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => human_duration(now.signed_duration_since(t.with_timezone(&Utc))),
        None => "<unknown>".into(),
    }
}

/// kubectl's short human duration: `45s`, `3m2s`, `15m`, `5h3m`, `2d3h`, `2y30d`.
pub fn human_duration(d: chrono::TimeDelta) -> String {
    let secs = d.num_seconds();
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let dy = days % 365;
        return if dy == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{dy}d")
        };
    }
    format!("{years}y")
}

fn statuses<'a>(o: &'a Value, field: &str) -> &'a [Value] {
    o.get("status")
        .and_then(|st| st.get(field))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn pod_ready(o: &Value, _: DateTime<Utc>) -> Value {
    let total = o
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = statuses(o, "containerStatuses")
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    json!(format!("{ready}/{total}"))
}

/// The STATUS column: the phase, refined by container states the way
/// kubectl shows them (`ContainerCreating`, `CrashLoopBackOff`,
/// `Init:0/1`, `Completed`, `Terminating`).
fn pod_status(o: &Value, _: DateTime<Utc>) -> Value {
    let mut reason = s(o, &["status", "phase"]).to_string();
    if !s(o, &["status", "reason"]).is_empty() {
        reason = s(o, &["status", "reason"]).to_string();
    }
    let gated = statuses(o, "conditions").iter().any(|c| {
        c.get("type").and_then(Value::as_str) == Some("PodScheduled")
            && c.get("reason").and_then(Value::as_str) == Some("SchedulingGated")
    });
    if gated {
        reason = "SchedulingGated".into();
    }
    let inits = statuses(o, "initContainerStatuses");
    let init_total = o
        .get("spec")
        .and_then(|s| s.get("initContainers"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let state = c.get("state");
        let term = state.and_then(|s| s.get("terminated"));
        let wait = state.and_then(|s| s.get("waiting"));
        if let Some(t) = term {
            if t.get("exitCode").and_then(Value::as_i64) == Some(0) {
                continue;
            }
            reason = match t.get("reason").and_then(Value::as_str) {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => match t.get("signal").and_then(Value::as_i64) {
                    Some(sig) if sig != 0 => format!("Init:Signal:{sig}"),
                    _ => format!(
                        "Init:ExitCode:{}",
                        t.get("exitCode")
                            .and_then(Value::as_i64)
                            .unwrap_or_default()
                    ),
                },
            };
        } else if let Some(r) = wait
            .and_then(|w| w.get("reason"))
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            reason = format!("Init:{r}");
        } else {
            reason = format!("Init:{i}/{init_total}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in statuses(o, "containerStatuses").iter().rev() {
            let state = c.get("state");
            let wait = state.and_then(|s| s.get("waiting"));
            let term = state.and_then(|s| s.get("terminated"));
            if let Some(r) = wait
                .and_then(|w| w.get("reason"))
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
            {
                reason = r.to_string();
            } else if let Some(t) = term {
                reason = match t.get("reason").and_then(Value::as_str) {
                    Some(r) if !r.is_empty() => r.to_string(),
                    _ => match t.get("signal").and_then(Value::as_i64) {
                        Some(sig) if sig != 0 => format!("Signal:{sig}"),
                        _ => format!(
                            "ExitCode:{}",
                            t.get("exitCode")
                                .and_then(Value::as_i64)
                                .unwrap_or_default()
                        ),
                    },
                };
            } else if state.and_then(|s| s.get("running")).is_some()
                && c.get("ready").and_then(Value::as_bool) == Some(true)
            {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    let deleting = o
        .get("metadata")
        .and_then(|m| m.get("deletionTimestamp"))
        .is_some_and(|t| !t.is_null());
    let terminal = matches!(s(o, &["status", "phase"]), "Succeeded" | "Failed");
    if deleting && s(o, &["status", "reason"]) == "NodeLost" {
        reason = "Unknown".into();
    } else if deleting && !terminal {
        reason = "Terminating".into();
    }
    json!(reason)
}

fn pod_restarts(o: &Value, now: DateTime<Utc>) -> Value {
    let mut restarts = 0i64;
    let mut last: Option<DateTime<Utc>> = None;
    for key in ["initContainerStatuses", "containerStatuses"] {
        for c in statuses(o, key) {
            restarts += c
                .get("restartCount")
                .and_then(Value::as_i64)
                .unwrap_or_default();
            let finished = c
                .get("lastState")
                .and_then(|l| l.get("terminated"))
                .and_then(|t| t.get("finishedAt"))
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            if let Some(f) = finished {
                if last.is_none_or(|l| f > l) {
                    last = Some(f);
                }
            }
        }
    }
    match last {
        Some(t) if restarts > 0 => json!(format!(
            "{restarts} ({} ago)",
            human_duration(now.signed_duration_since(t))
        )),
        _ => json!(restarts.to_string()),
    }
}

fn pod_readiness_gates(o: &Value, _: DateTime<Utc>) -> Value {
    let gates = o
        .get("spec")
        .and_then(|s| s.get("readinessGates"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if gates.is_empty() {
        return json!("<none>");
    }
    let conds = statuses(o, "conditions");
    let ok = gates
        .iter()
        .filter(|g| {
            let ty = g.get("conditionType");
            conds.iter().any(|c| {
                c.get("type") == ty && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
        .count();
    json!(format!("{ok}/{}", gates.len()))
}

fn template_containers(o: &Value, field: &str) -> Value {
    let list = o
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("spec"))
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| c.get(field).and_then(Value::as_str).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!(list)
}

/// `app=web,tier in (a,b)`, as `metav1.FormatLabelSelector` prints.
fn label_selector(sel: Option<&Value>) -> String {
    let Some(sel) = sel.filter(|s| s.is_object()) else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = Vec::new();
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        let mut kv: Vec<String> = ml
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        kv.sort();
        parts.extend(kv);
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
            let mut values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            values.sort_unstable();
            let vals = values.join(",");
            parts.push(
                match e
                    .get("operator")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                {
                    "In" => format!("{key} in ({vals})"),
                    "NotIn" => format!("{key} notin ({vals})"),
                    "Exists" => key.to_string(),
                    "DoesNotExist" => format!("!{key}"),
                    other => format!("{key} {other} ({vals})"),
                },
            );
        }
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

/// A plain `map[string]string` selector, sorted by key.
fn map_selector(sel: Option<&Value>) -> String {
    match sel.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => {
            let mut kv: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            kv.sort();
            kv.join(",")
        }
        _ => "<none>".into(),
    }
}

fn service_external_ip(o: &Value, _: DateTime<Utc>) -> Value {
    let spec = o.get("spec");
    let external: Vec<&str> = spec
        .and_then(|s| s.get("externalIPs"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let ty = s(o, &["spec", "type"]);
    let text = match ty {
        "ExternalName" => s(o, &["spec", "externalName"]).to_string(),
        "LoadBalancer" => {
            let mut ips: Vec<String> = o
                .get("status")
                .and_then(|st| st.get("loadBalancer"))
                .and_then(|lb| lb.get("ingress"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| {
                            i.get("ip")
                                .or_else(|| i.get("hostname"))
                                .and_then(Value::as_str)
                        })
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            ips.extend(external.iter().map(|s| s.to_string()));
            if ips.is_empty() {
                "<pending>".into()
            } else {
                ips.join(",")
            }
        }
        _ if !external.is_empty() => external.join(","),
        _ => "<none>".into(),
    };
    json!(text)
}

fn service_ports(o: &Value, _: DateTime<Utc>) -> Value {
    let ports = o
        .get("spec")
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if ports.is_empty() {
        return json!("<none>");
    }
    let text = ports
        .iter()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or_default();
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) if np > 0 => format!("{port}:{np}/{proto}"),
                _ => format!("{port}/{proto}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    json!(text)
}

fn node_status(o: &Value, _: DateTime<Utc>) -> Value {
    let ready = statuses(o, "conditions")
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut text = match ready {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if o.get("spec")
        .and_then(|s| s.get("unschedulable"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        text.push_str(",SchedulingDisabled");
    }
    json!(text)
}

fn node_roles(o: &Value, _: DateTime<Utc>) -> Value {
    let mut roles: Vec<String> = o
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| {
                    if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                        (!role.is_empty()).then(|| role.to_string())
                    } else if k == "kubernetes.io/role" {
                        v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
                    } else {
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    roles.dedup();
    json!(if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    })
}

fn node_address(o: &Value, ty: &str) -> Value {
    let addr = statuses(o, "addresses")
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some(ty))
        .and_then(|a| a.get("address").and_then(Value::as_str))
        .unwrap_or_default();
    none_if_empty(addr)
}

fn event_last_seen(o: &Value, now: DateTime<Utc>) -> Value {
    let ts = o
        .get("series")
        .and_then(|s| s.get("lastObservedTime"))
        .or_else(|| o.get("lastTimestamp").filter(|v| !v.is_null()))
        .or_else(|| o.get("eventTime").filter(|v| !v.is_null()))
        .or_else(|| o.get("firstTimestamp").filter(|v| !v.is_null()))
        .or_else(|| o.get("metadata").and_then(|m| m.get("creationTimestamp")));
    json!(age(ts, now))
}

fn event_object(o: &Value, _: DateTime<Utc>) -> Value {
    let kind = s(o, &["involvedObject", "kind"]).to_ascii_lowercase();
    let name = s(o, &["involvedObject", "name"]);
    json!(format!("{kind}/{name}"))
}

fn event_source(o: &Value, _: DateTime<Utc>) -> Value {
    let comp = {
        let c = s(o, &["source", "component"]);
        if c.is_empty() {
            s(o, &["reportingComponent"])
        } else {
            c
        }
    };
    let host = s(o, &["source", "host"]);
    json!(if host.is_empty() {
        comp.to_string()
    } else {
        format!("{comp}, {host}")
    })
}

/// `10.42.0.5:80,10.42.0.6:80 + 3 more...`, as kubectl shows endpoints.
fn endpoints_list(o: &Value, _: DateTime<Utc>) -> Value {
    let mut all: Vec<String> = Vec::new();
    for subset in o
        .get("subsets")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
    {
        let addrs = subset
            .get("addresses")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let ports = subset
            .get("ports")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for a in addrs {
            let ip = a.get("ip").and_then(Value::as_str).unwrap_or_default();
            if ports.is_empty() {
                all.push(ip.to_string());
            }
            for p in ports {
                all.push(format!(
                    "{ip}:{}",
                    p.get("port").and_then(Value::as_i64).unwrap_or_default()
                ));
            }
        }
    }
    json!(truncate_list(all))
}

fn truncate_list(all: Vec<String>) -> String {
    if all.is_empty() {
        return "<none>".into();
    }
    let more = all.len().saturating_sub(3);
    let shown = all.into_iter().take(3).collect::<Vec<_>>().join(",");
    if more > 0 {
        format!("{shown} + {more} more...")
    } else {
        shown
    }
}

fn slice_ports(o: &Value, _: DateTime<Utc>) -> Value {
    let ports: Vec<String> = o
        .get("ports")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("port").and_then(Value::as_i64))
                .map(|p| p.to_string())
                .collect()
        })
        .unwrap_or_default();
    json!(if ports.is_empty() {
        "<unset>".to_string()
    } else {
        ports.join(",")
    })
}

fn slice_endpoints(o: &Value, _: DateTime<Utc>) -> Value {
    let addrs: Vec<String> = o
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| e.get("addresses").and_then(Value::as_array))
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    json!(truncate_list(addrs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::by_kind;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-01-10T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    fn table(kind: (&str, &str), objs: Vec<Value>) -> Value {
        let res = by_kind(kind.0, kind.1).expect("served");
        to_table_at(res, &objs, json!({"resourceVersion":"7"}), now())
    }

    fn names(t: &Value) -> Vec<(String, u64)> {
        t["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_string(),
                    c["priority"].as_u64().unwrap_or(9),
                )
            })
            .collect()
    }

    #[test]
    fn ages_read_like_kubectl() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (5, "5s"),
            (119, "119s"),
            (182, "3m2s"),
            (240, "4m"),
            (900, "15m"),
            (3 * 3600 + 180, "3h3m"),
            (10 * 3600, "10h"),
            (2 * 86400, "2d"),
            (2 * 86400 + 3 * 3600, "2d3h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400 + 86400 * 10, "3y10d"),
            (9 * 365 * 86400, "9y"),
        ] {
            assert_eq!(
                human_duration(chrono::TimeDelta::seconds(secs)),
                want,
                "{secs}"
            );
        }
    }

    #[test]
    fn pod_tables_have_kube_columns_and_cells() {
        let pod = json!({"metadata":{"name":"web","creationTimestamp":"2024-01-10T11:58:00Z"},
            "spec":{"nodeName":"n1","containers":[{"name":"a"},{"name":"b"}]},
            "status":{"phase":"Running","podIP":"10.42.0.5","containerStatuses":[
                {"name":"a","ready":true,"restartCount":2,"state":{"running":{}},"lastState":{"terminated":{"finishedAt":"2024-01-10T11:59:00Z"}}},
                {"name":"b","ready":false,"restartCount":0,"state":{"waiting":{"reason":"CrashLoopBackOff"}}}]}});
        let t = table(("v1", "Pod"), vec![pod]);
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        let cols: Vec<(String, u64)> = names(&t);
        let expect: Vec<(String, u64)> = [
            ("Name", 0),
            ("Ready", 0),
            ("Status", 0),
            ("Restarts", 0),
            ("Age", 0),
            ("IP", 1),
            ("Node", 1),
            ("Nominated Node", 1),
            ("Readiness Gates", 1),
        ]
        .iter()
        .map(|(n, p)| (n.to_string(), *p))
        .collect();
        assert_eq!(cols, expect);
        assert_eq!(t["columnDefinitions"][0]["format"], "name");
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "web",
                "1/2",
                "CrashLoopBackOff",
                "2 (60s ago)",
                "2m",
                "10.42.0.5",
                "n1",
                "<none>",
                "<none>"
            ])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "web");
    }

    #[test]
    fn pod_status_shows_init_progress_completion_and_termination() {
        let cases = [
            (
                json!({"spec":{"initContainers":[{"name":"i"}]},"status":{"phase":"Pending","initContainerStatuses":[{"state":{"waiting":{"reason":"PodInitializing"}}}]}}),
                "Init:0/1",
            ),
            (
                json!({"status":{"phase":"Succeeded","containerStatuses":[{"state":{"terminated":{"reason":"Completed","exitCode":0}}}]}}),
                "Completed",
            ),
            (
                json!({"status":{"phase":"Failed","containerStatuses":[{"state":{"terminated":{"exitCode":3}}}]}}),
                "ExitCode:3",
            ),
            (
                json!({"metadata":{"deletionTimestamp":"2024-01-10T11:00:00Z"},"status":{"phase":"Running"}}),
                "Terminating",
            ),
            (
                json!({"status":{"phase":"Pending","containerStatuses":[{"state":{"waiting":{"reason":"ContainerCreating"}}}]}}),
                "ContainerCreating",
            ),
            (
                json!({"status":{"phase":"Pending","conditions":[{"type":"PodScheduled","status":"False","reason":"SchedulingGated"}]}}),
                "SchedulingGated",
            ),
            (
                json!({"metadata":{"deletionTimestamp":"2024-01-10T11:00:00Z"},"status":{"phase":"Succeeded"}}),
                "Succeeded",
            ),
        ];
        for (pod, want) in cases {
            assert_eq!(pod_status(&pod, now()), json!(want), "{pod}");
        }
    }

    #[test]
    fn deployment_and_replicaset_tables_count_replicas() {
        let d = json!({"metadata":{"name":"web"},"spec":{"replicas":3,"selector":{"matchLabels":{"app":"web"}},
            "template":{"spec":{"containers":[{"name":"c","image":"nginx:1"},{"name":"s","image":"envoy"}]}}},
            "status":{"readyReplicas":2,"updatedReplicas":3,"availableReplicas":2}});
        let t = table(("apps/v1", "Deployment"), vec![d.clone()]);
        let cols: Vec<String> = names(&t).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            cols,
            vec![
                "Name",
                "Ready",
                "Up-to-date",
                "Available",
                "Age",
                "Containers",
                "Images",
                "Selector"
            ]
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "web",
                "2/3",
                3,
                2,
                "<unknown>",
                "c,s",
                "nginx:1,envoy",
                "app=web"
            ])
        );
        let t = table(("apps/v1", "ReplicaSet"), vec![d]);
        assert_eq!(t["rows"][0]["cells"][1], 3);
    }

    #[test]
    fn service_tables_show_type_ips_and_ports() {
        let s = json!({"metadata":{"name":"web"},"spec":{"type":"NodePort","clusterIP":"10.43.0.10","selector":{"app":"web"},
            "ports":[{"port":80,"nodePort":30080,"protocol":"TCP"},{"port":53,"protocol":"UDP"}]}});
        let t = table(("v1", "Service"), vec![s]);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "web",
                "NodePort",
                "10.43.0.10",
                "<none>",
                "80:30080/TCP,53/UDP",
                "<unknown>",
                "app=web"
            ])
        );
        let lb = json!({"metadata":{"name":"lb"},"spec":{"type":"LoadBalancer","clusterIP":"10.43.0.2","ports":[{"port":80}]}});
        assert_eq!(
            table(("v1", "Service"), vec![lb])["rows"][0]["cells"][3],
            "<pending>"
        );
    }

    #[test]
    fn node_namespace_and_config_tables_have_their_columns() {
        let node = json!({"metadata":{"name":"n1","labels":{"node-role.kubernetes.io/control-plane":"true"}},
            "spec":{"unschedulable":true},
            "status":{"conditions":[{"type":"Ready","status":"True"}],"nodeInfo":{"kubeletVersion":"v1.32.0-evoke"},
            "addresses":[{"type":"InternalIP","address":"10.0.0.1"}]}});
        let t = table(("v1", "Node"), vec![node]);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "n1",
                "Ready,SchedulingDisabled",
                "control-plane",
                "<unknown>",
                "v1.32.0-evoke",
                "10.0.0.1",
                "<none>",
                "<unknown>",
                "<unknown>",
                "<unknown>"
            ])
        );
        let ns = table(
            ("v1", "Namespace"),
            vec![json!({"metadata":{"name":"dev"},"status":{"phase":"Active"}})],
        );
        assert_eq!(
            ns["rows"][0]["cells"],
            json!(["dev", "Active", "<unknown>"])
        );
        let cm = table(
            ("v1", "ConfigMap"),
            vec![json!({"metadata":{"name":"c"},"data":{"a":"1","b":"2"}})],
        );
        assert_eq!(cm["rows"][0]["cells"][1], 2);
        let sec = table(
            ("v1", "Secret"),
            vec![json!({"metadata":{"name":"s"},"type":"Opaque","data":{"a":"MQ=="}})],
        );
        assert_eq!(
            sec["rows"][0]["cells"],
            json!(["s", "Opaque", 1, "<unknown>"])
        );
        let rc = table(
            ("node.k8s.io/v1", "RuntimeClass"),
            vec![json!({"metadata":{"name":"microvm"},"handler":"microvm"})],
        );
        assert_eq!(rc["rows"][0]["cells"][1], "microvm");
        let lease = table(
            ("coordination.k8s.io/v1", "Lease"),
            vec![json!({"metadata":{"name":"n1"},"spec":{"holderIdentity":"n1"}})],
        );
        assert_eq!(lease["rows"][0]["cells"][1], "n1");
    }

    #[test]
    fn endpoints_and_events_print_like_kubectl() {
        let ep = json!({"metadata":{"name":"web"},"subsets":[{"addresses":[{"ip":"10.0.0.1"},{"ip":"10.0.0.2"},{"ip":"10.0.0.3"},{"ip":"10.0.0.4"}],"ports":[{"port":80}]}]});
        let t = table(("v1", "Endpoints"), vec![ep]);
        assert_eq!(
            t["rows"][0]["cells"][1],
            "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 + 1 more..."
        );
        let ev = json!({"metadata":{"name":"e1"},"type":"Normal","reason":"Scheduled","message":"assigned",
            "involvedObject":{"kind":"Pod","name":"web"},"lastTimestamp":"2024-01-10T11:59:50Z"});
        let t = table(("v1", "Event"), vec![ev]);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "10s");
        assert_eq!(cells[3], "pod/web");
        assert_eq!(cells[6], "assigned");
    }

    #[test]
    fn every_served_kind_prints_without_panicking_on_odd_objects() {
        for res in crate::registry::RESOURCES {
            let objs = vec![
                json!(null),
                json!({"metadata":3,"spec":[1],"status":"x"}),
                json!({}),
            ];
            let t = to_table_at(res, &objs, json!(null), now());
            assert_eq!(t["rows"].as_array().map(Vec::len), Some(3));
        }
    }
}
