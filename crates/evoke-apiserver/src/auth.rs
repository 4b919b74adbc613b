//! Authentication and the node authorizer.
//!
//! Who is calling ([`authenticate`]):
//! - a client certificate our CA signed (rustls verified it, validity
//!   included, during the handshake): O `system:masters` is an admin, CN
//!   `system:node:NAME` with O `system:nodes` is node NAME;
//! - the admin bearer token;
//! - the join secret (the node token): a bootstrap credential that may
//!   only ask for a node's certificates (`bootstrap.rs`), nothing else.
//!
//! Nothing else gets in. Tokens are compared in constant time and never
//! logged.
//!
//! What a node may do ([`authorize`]; admins may do anything), as
//! Kubernetes' node authorizer and NodeRestriction admission allow a
//! kubelet: it reads what it likes except Secrets and ConfigMaps, of which
//! it reads only those its own pods use, one by one; it writes only its own Node (and its
//! status), its own Lease, the status of pods bound to it, the deletion of
//! pods bound to it, Events, and the kube-node-lease namespace. It may not
//! use the pod subresources that reach into workloads (exec, attach, logs,
//! port-forward, proxy). So one node's credential cannot create workloads,
//! touch another node or its pods, read logs or exec into pods.

use evoke_types::registry;
use http::{HeaderMap, Method};
use serde_json::Value;

use crate::tls::{Subject, MASTERS_GROUP, NODES_GROUP, NODE_CN_PREFIX};
use crate::{object, State};

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// The admin token, or a certificate in group system:masters.
    Admin,
    /// A node's certificate: `system:node:<name>` in group system:nodes.
    Node(String),
    /// The join secret: it may only ask for a node's certificates.
    Bootstrap,
}

/// Where a joining agent trades the join secret (and its node password)
/// for its certificates. Outside the resource tree, like k3s's
/// `/v1-k3s/...` paths.
pub(crate) const JOIN_PATH: &str = "/v1-evoke/node-credentials";

/// The identity a verified client certificate carries, or None when its
/// subject names no one we know (such a caller gets 401).
pub(crate) fn certificate_identity(subject: &Subject) -> Option<Identity> {
    if subject.orgs.iter().any(|o| o == MASTERS_GROUP) {
        return Some(Identity::Admin);
    }
    let node = subject.cn.strip_prefix(NODE_CN_PREFIX)?;
    (subject.orgs.iter().any(|o| o == NODES_GROUP) && !node.is_empty())
        .then(|| Identity::Node(node.to_string()))
}

/// Decides who is calling, or None for 401. `cert` is what the verified
/// client certificate says (None without one); a certificate wins over a
/// bearer token.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    cert: Option<Option<Identity>>,
    token: &str,
    node_token: &str,
) -> Option<Identity> {
    if let Some(from_cert) = cert {
        return from_cert;
    }
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, given) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let given = given.trim().as_bytes();
    // Both comparisons always run, so timing tells nothing either.
    let admin = !token.is_empty() && constant_time_eq(given, token.as_bytes());
    let node = !node_token.is_empty() && constant_time_eq(given, node_token.as_bytes());
    match (admin, node) {
        (true, _) => Some(Identity::Admin),
        (false, true) => Some(Identity::Bootstrap),
        (false, false) => None,
    }
}

/// What a request touches, from its path.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    /// "" for the core group.
    group: &'a str,
    namespace: Option<&'a str>,
    resource: &'a str,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
}

/// Parses `/api/v1/...` and `/apis/GROUP/VERSION/...` exactly as the
/// router does (`route.rs`: empty segments dropped, the legacy `watch/`
/// prefix, a namespace's own `status`/`finalize`), so no spelling of a path
/// reaches a resource other than the one judged here. None for paths
/// outside the resource tree (discovery, /version, /openapi...).
fn target(path: &str) -> Option<Target<'_>> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, mut rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    if rest.first() == Some(&"watch") {
        rest = &rest[1..];
    }
    let mut namespace = None;
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
    {
        namespace = Some(rest[1]);
        rest = &rest[2..];
    }
    let t = |resource, name, subresource| {
        Some(Target {
            group,
            namespace,
            resource,
            name,
            subresource,
        })
    };
    match rest {
        [] => None,
        [resource] => t(resource, None, None),
        [resource, name] => t(resource, Some(*name), None),
        [resource, name, sub, ..] => t(resource, Some(*name), Some(*sub)),
    }
}

/// `metadata.name` of a JSON (or YAML) request body.
fn body_name(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body)
        .ok()
        .or_else(|| serde_yaml::from_slice(body).ok())?;
    v["metadata"]["name"].as_str().map(String::from)
}

/// The node a stored pod is bound to ("" when unbound or missing).
async fn pod_node(state: &State, namespace: &str, name: &str) -> Result<String, String> {
    let pods = registry::by_plural("", "v1", "pods").ok_or("pods are not in the registry")?;
    let kv = state
        .store
        .get(&object::key(pods, Some(namespace), name))
        .await
        .map_err(|e| format!("reading pod {namespace}/{name}: {e}"))?;
    Ok(kv
        .and_then(|kv| object::from_kv(&kv).ok())
        .and_then(|p| p["spec"]["nodeName"].as_str().map(String::from))
        .unwrap_or_default())
}

/// Whether `who` may make this request; Err is the reason for a 403.
/// `body` is the request body (a created object's name is in it).
pub(crate) async fn authorize(
    state: &State,
    who: &Identity,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    let node = match who {
        Identity::Admin => return Ok(()),
        Identity::Bootstrap => {
            return Err(format!(
                "the join token only admits a node (POST {JOIN_PATH}); it may not {} {path}",
                method.as_str().to_ascii_lowercase()
            ))
        }
        Identity::Node(node) => node.as_str(),
    };
    let verb = method.as_str().to_ascii_lowercase();
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let Some(t) = target(path) else {
        // Discovery, /version, /openapi: all read-only.
        return if read {
            Ok(())
        } else {
            Err(format!("node {node} may not {verb} {path}"))
        };
    };
    let denied = |why: &str| {
        let what = match t.subresource {
            Some(sub) => format!("{}/{sub}", t.resource),
            None => t.resource.to_string(),
        };
        format!(
            "node {node} may not {verb} resource \"{what}\" in API group \"{}\"{why}",
            t.group
        )
    };
    // Subresources that reach into a workload are for users, not nodes.
    if matches!(t.resource, "pods" | "nodes")
        && matches!(
            t.subresource,
            Some("exec" | "attach" | "log" | "portforward" | "proxy")
        )
    {
        return Err(denied(""));
    }
    if read {
        return node_read(state, node, &t, query, &denied).await;
    }
    // The name a write is about: in the path, or in a created object.
    let named = || -> Option<String> {
        match (method, t.name) {
            (&Method::POST, None) => body_name(body),
            (_, Some(n)) => Some(n.to_string()),
            _ => None,
        }
    };
    let own = || named().as_deref() == Some(node);
    let is = |m: &[Method]| m.contains(method);
    use Method as M;
    match (t.group, t.resource, t.subresource) {
        // Its own Node object and status (registration, heartbeats).
        ("", "nodes", None | Some("status")) if is(&[M::POST, M::PUT, M::PATCH]) => {
            if own() {
                Ok(())
            } else {
                Err(denied(": a node may write only its own Node"))
            }
        }
        // Its own Lease, in kube-node-lease.
        ("coordination.k8s.io", "leases", None) if is(&[M::POST, M::PUT, M::PATCH]) => {
            if t.namespace == Some(crate::bootstrap::NODE_LEASE_NAMESPACE) && own() {
                Ok(())
            } else {
                Err(denied(
                    ": a node may write only its own Lease in kube-node-lease",
                ))
            }
        }
        // The status of its pods, and their final deletion.
        ("", "pods", Some("status")) if is(&[M::PUT, M::PATCH]) => {
            own_pod(state, node, &t, &denied).await
        }
        ("", "pods", None) if *method == M::DELETE && t.name.is_some() => {
            own_pod(state, node, &t, &denied).await
        }
        // Events about what it did.
        ("", "events", None) | ("events.k8s.io", "events", None)
            if is(&[M::POST, M::PUT, M::PATCH]) =>
        {
            Ok(())
        }
        // The kube-node-lease namespace, if it is missing.
        ("", "namespaces", None)
            if *method == M::POST
                && named().as_deref() == Some(crate::bootstrap::NODE_LEASE_NAMESPACE) =>
        {
            Ok(())
        }
        _ => Err(denied("")),
    }
}

/// What node `node` may read (get, list, watch), as Kubernetes 1.32's node
/// authorizer with AuthorizeNodeWithSelectors allows a kubelet: its own
/// pods (by name, or listed and watched with the field selector
/// `spec.nodeName=NODE`), the Secrets and ConfigMaps they use, its own
/// Lease, Services, Endpoints and EndpointSlices (its service proxy and
/// DNS), RuntimeClasses, and Nodes. Unlike Kubernetes, every Node, not only
/// its own: the node's pod network routes to every other node's podCIDR
/// (k3s gives its agent's flannel a second identity for that). Nothing
/// else: no Deployments, Namespaces, Events, ServiceAccounts...
async fn node_read(
    state: &State,
    node: &str,
    t: &Target<'_>,
    query: Option<&str>,
    denied: &(dyn Fn(&str) -> String + Sync),
) -> Result<(), String> {
    match (t.group, t.resource) {
        ("", "secrets" | "configmaps") => {
            let kind = Referenced::of(t.resource).ok_or_else(|| denied(""))?;
            own_reference(state, node, kind, t, denied).await
        }
        ("", "pods") if t.name.is_some() => own_pod(state, node, t, denied).await,
        ("", "pods") => {
            if selects_node(query, node) {
                Ok(())
            } else {
                Err(denied(&format!(
                    ": a node lists and watches only its own pods (fieldSelector spec.nodeName={node})"
                )))
            }
        }
        ("coordination.k8s.io", "leases") => {
            if t.namespace == Some(crate::bootstrap::NODE_LEASE_NAMESPACE) && t.name == Some(node) {
                Ok(())
            } else {
                Err(denied(
                    ": a node reads only its own Lease in kube-node-lease",
                ))
            }
        }
        ("", "nodes" | "services" | "endpoints")
        | ("discovery.k8s.io", "endpointslices")
        | ("node.k8s.io", "runtimeclasses") => Ok(()),
        _ => Err(denied("")),
    }
}

/// Whether a query's fieldSelector requires `spec.nodeName` to be `node`
/// (one of its comma-separated terms is `spec.nodeName=node` or `==node`).
fn selects_node(query: Option<&str>, node: &str) -> bool {
    let params = crate::route::Params::parse(query);
    params.get("fieldSelector").is_some_and(|v| {
        v.split(',').any(|term| {
            term.split_once('=').is_some_and(|(field, value)| {
                field.trim() == "spec.nodeName"
                    && value.strip_prefix('=').unwrap_or(value).trim() == node
            })
        })
    })
}

/// Labels a node may not set, change or remove on its own Node, as
/// Kubernetes' NodeRestriction admission decides (KEP-279): anything under
/// `node-restriction.kubernetes.io/` (where admins put labels workloads may
/// trust), and any other `kubernetes.io` or `k8s.io` label except the
/// kubelet's own set (hostname, os, arch, instance type, topology) and the
/// `kubelet.kubernetes.io/` and `node.kubernetes.io/` prefixes. So a node
/// cannot steer workloads meant for other nodes to itself, e.g. by calling
/// itself `node-role.kubernetes.io/control-plane`.
pub fn node_may_not_set_label(key: &str) -> bool {
    const KUBELET_LABELS: [&str; 11] = [
        "kubernetes.io/hostname",
        "kubernetes.io/os",
        "kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
    ];
    let domain = key.split_once('/').map_or("", |(d, _)| d);
    let under = |base: &str| {
        domain == base
            || domain
                .strip_suffix(base)
                .is_some_and(|rest| rest.ends_with('.'))
    };
    if under("node-restriction.kubernetes.io") {
        return true;
    }
    let kubernetes = under("kubernetes.io") || under("k8s.io");
    kubernetes
        && !KUBELET_LABELS.contains(&key)
        && !under("kubelet.kubernetes.io")
        && !under("node.kubernetes.io")
}

/// NodeRestriction for a node writing its own Node: `old` is None for a
/// create. A node may register with taints but never change them later
/// (the node lifecycle controller owns them), and may not set, change or
/// remove the labels [`node_may_not_set_label`] names. Err is the message
/// of a 403.
pub(crate) fn admit_node_object(
    node: &str,
    old: Option<&Value>,
    new: &Value,
) -> Result<(), String> {
    let labels = |v: Option<&Value>| {
        v.and_then(|v| v["metadata"]["labels"].as_object().cloned())
            .unwrap_or_default()
    };
    let (before, after) = (labels(old), labels(Some(new)));
    let mut changed: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k) && node_may_not_set_label(k))
        .collect();
    changed.sort();
    changed.dedup();
    if !changed.is_empty() {
        let list: Vec<&str> = changed.iter().map(|k| k.as_str()).collect();
        return Err(format!(
            "node \"{node}\" is not allowed to modify labels: {}",
            list.join(", ")
        ));
    }
    if let Some(old) = old {
        let taints = |v: &Value| {
            v["spec"]["taints"]
                .as_array()
                .filter(|a| !a.is_empty())
                .cloned()
        };
        if taints(old) != taints(new) {
            return Err(format!("node \"{node}\" is not allowed to modify taints"));
        }
    }
    Ok(())
}

/// What a pod may reference by name that a node may then read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Referenced {
    Secret,
    ConfigMap,
}

impl Referenced {
    /// The kind a read of core `resource` is about, if it is one.
    fn of(resource: &str) -> Option<Referenced> {
        match resource {
            "secrets" => Some(Referenced::Secret),
            "configmaps" => Some(Referenced::ConfigMap),
            _ => None,
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Referenced::Secret => "secrets",
            Referenced::ConfigMap => "configmaps",
        }
    }
}

/// Whether pod `p` uses the `kind` named `name`: env, envFrom, volumes
/// (also projected) or, for a secret, imagePullSecrets.
fn uses(p: &Value, kind: Referenced, name: &str) -> bool {
    let (key_ref, from_ref, volume, volume_name, projected) = match kind {
        Referenced::Secret => (
            "secretKeyRef",
            "secretRef",
            "secret",
            "secretName",
            "secret",
        ),
        Referenced::ConfigMap => (
            "configMapKeyRef",
            "configMapRef",
            "configMap",
            "name",
            "configMap",
        ),
    };
    let spec = &p["spec"];
    let is = |v: &Value| v.as_str() == Some(name);
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|f| spec[*f].as_array().into_iter().flatten());
    for c in containers {
        let env = c["env"].as_array().into_iter().flatten();
        if env.map(|e| &e["valueFrom"][key_ref]["name"]).any(is) {
            return true;
        }
        let env_from = c["envFrom"].as_array().into_iter().flatten();
        if env_from.map(|e| &e[from_ref]["name"]).any(is) {
            return true;
        }
    }
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if is(&v[volume][volume_name]) {
            return true;
        }
        let sources = v["projected"]["sources"].as_array().into_iter().flatten();
        if sources.map(|s| &s[projected]["name"]).any(is) {
            return true;
        }
    }
    kind == Referenced::Secret
        && spec["imagePullSecrets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| is(&r["name"]))
}

/// Ok when the secret or config map `t` names is used by a pod bound to
/// `node` (a list or watch of them is never a node's), as Kubernetes' node
/// authorizer allows.
async fn own_reference(
    state: &State,
    node: &str,
    kind: Referenced,
    t: &Target<'_>,
    denied: &(dyn Fn(&str) -> String + Sync),
) -> Result<(), String> {
    let what = kind.plural();
    let (Some(ns), Some(name)) = (t.namespace, t.name) else {
        return Err(denied(&format!(
            ": a node reads only the {what} its pods use, by name"
        )));
    };
    let pods = registry::by_plural("", "v1", "pods").ok_or("pods are not in the registry")?;
    let listed = state
        .store
        .list(&object::prefix(pods, Some(ns)), Default::default())
        .await
        .map_err(|e| format!("listing pods in {ns}: {e}"))?;
    let used = listed.items.iter().any(|kv| {
        object::from_kv(kv).is_ok_and(|p| p["spec"]["nodeName"] == node && uses(&p, kind, name))
    });
    if used {
        Ok(())
    } else {
        Err(denied(&format!(
            ": no pod on node {node} uses {what} {ns}/{name}"
        )))
    }
}

/// Ok when the pod `t` names is bound to `node`.
async fn own_pod(
    state: &State,
    node: &str,
    t: &Target<'_>,
    denied: &(dyn Fn(&str) -> String + Sync),
) -> Result<(), String> {
    let (Some(ns), Some(name)) = (t.namespace, t.name) else {
        return Err(denied(""));
    };
    if pod_node(state, ns, name).await? == node {
        Ok(())
    } else {
        Err(denied(&format!(
            ": pod {ns}/{name} is not bound to node {node}"
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().expect("header"));
        h
    }

    #[test]
    fn the_admin_token_and_the_join_secret_authenticate_differently() {
        assert_eq!(
            authenticate(&bearer("Bearer abc"), None, "abc", "nod"),
            Some(Identity::Admin)
        );
        assert_eq!(
            authenticate(&bearer("Bearer nod"), None, "abc", "nod"),
            Some(Identity::Bootstrap)
        );
    }

    #[test]
    fn a_certificate_is_an_admin_a_node_or_nobody_by_its_subject() {
        let subject = |cn: &str, orgs: &[&str]| Subject {
            cn: cn.into(),
            orgs: orgs.iter().map(|o| o.to_string()).collect(),
        };
        assert_eq!(
            certificate_identity(&subject("admin", &["system:masters"])),
            Some(Identity::Admin)
        );
        assert_eq!(
            certificate_identity(&subject("system:node:n2", &["system:nodes"])),
            Some(Identity::Node("n2".into()))
        );
        // A node name without the group, or the group without a name.
        assert_eq!(certificate_identity(&subject("system:node:n2", &[])), None);
        assert_eq!(
            certificate_identity(&subject("system:node:", &["system:nodes"])),
            None
        );
        assert_eq!(certificate_identity(&subject("someone", &["x"])), None);
        // A certificate decides, whatever token comes with it.
        assert_eq!(
            authenticate(&bearer("Bearer abc"), Some(None), "abc", "nod"),
            None
        );
        assert_eq!(
            authenticate(
                &bearer("Bearer abc"),
                Some(Some(Identity::Node("n".into()))),
                "abc",
                "nod"
            ),
            Some(Identity::Node("n".into()))
        );
    }

    #[test]
    fn wrong_missing_or_non_bearer_credentials_are_refused() {
        assert_eq!(
            authenticate(&bearer("Bearer abd"), None, "abc", "nod"),
            None
        );
        assert_eq!(authenticate(&bearer("Basic abc"), None, "abc", "nod"), None);
        assert_eq!(authenticate(&HeaderMap::new(), None, "abc", "nod"), None);
        assert_eq!(authenticate(&bearer("Bearer "), None, "", ""), None);
    }

    #[test]
    fn paths_name_their_group_namespace_resource_name_and_subresource() {
        let t = |group, namespace, resource, name, subresource| {
            Some(Target {
                group,
                namespace,
                resource,
                name,
                subresource,
            })
        };
        assert_eq!(target("/api/v1/nodes"), t("", None, "nodes", None, None));
        assert_eq!(
            target("/api/v1/nodes/n2/status"),
            t("", None, "nodes", Some("n2"), Some("status"))
        );
        assert_eq!(
            target("/api/v1/namespaces/default/pods/p/exec"),
            t("", Some("default"), "pods", Some("p"), Some("exec"))
        );
        assert_eq!(
            target("/api/v1/namespaces/default"),
            t("", None, "namespaces", Some("default"), None)
        );
        assert_eq!(
            target("/api/v1/namespaces/x/finalize"),
            t("", None, "namespaces", Some("x"), Some("finalize"))
        );
        assert_eq!(
            target("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2"),
            t(
                "coordination.k8s.io",
                Some("kube-node-lease"),
                "leases",
                Some("n2"),
                None
            )
        );
        // Spellings the router accepts name the same target.
        assert_eq!(
            target("//api//v1/namespaces//default/pods/"),
            t("", Some("default"), "pods", None, None)
        );
        assert_eq!(
            target("/api/v1/watch/namespaces/default/pods"),
            t("", Some("default"), "pods", None, None)
        );
        assert_eq!(target("/apis/apps/v1"), None);
        assert_eq!(target("/version"), None);
    }

    async fn state_with_pods(pods: &[(&str, &str)]) -> State {
        let store: std::sync::Arc<dyn evoke_store::Backend> =
            std::sync::Arc::new(evoke_store::memory::MemoryBackend::new());
        let res = registry::by_plural("", "v1", "pods").expect("pods");
        for (name, node) in pods {
            let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ns"}, "spec": {"nodeName": node,
                    "containers": [{"name": "c", "env": [{"name": "E",
                        "valueFrom": {"secretKeyRef": {"name": format!("{name}-env"), "key": "k"}}}],
                        "envFrom": [{"configMapRef": {"name": format!("{name}-cm")}}]}],
                    "volumes": [{"name": "v", "secret": {"secretName": format!("{name}-vol")}}]}});
            store
                .create(&object::key(res, Some("ns"), name), object::to_bytes(&pod))
                .await
                .expect("pod stored");
        }
        State::for_tests(store)
    }

    #[tokio::test]
    async fn a_node_reads_only_its_pods_secrets_and_config_maps_and_writes_only_its_own_node_lease_and_pods(
    ) {
        let state = state_with_pods(&[("mine", "n2"), ("theirs", "n3")]).await;
        let node = Identity::Node("n2".into());
        let named = |n: &str| format!(r#"{{"metadata": {{"name": "{n}"}}}}"#);
        let try_ = |m: Method, p: &'static str, body: String| {
            let (state, node) = (&state, &node);
            async move {
                let (path, query) = p.split_once('?').map_or((p, None), |(a, q)| (a, Some(q)));
                authorize(state, node, &m, path, query, body.as_bytes()).await
            }
        };
        let ok = |m: Method, p: &'static str| try_(m, p, String::new());
        // What the agent does.
        assert!(
            ok(Method::GET, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn2")
                .await
                .is_ok()
        );
        assert!(ok(
            Method::GET,
            "/api/v1/watch/pods?watch=1&fieldSelector=status.phase%21%3DFailed%2Cspec.nodeName%3D%3Dn2"
        )
        .await
        .is_ok());
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/pods/mine")
            .await
            .is_ok());
        for p in [
            "/api/v1/nodes",
            "/api/v1/nodes/n3",
            "/api/v1/services",
            "/api/v1/endpoints",
            "/apis/discovery.k8s.io/v1/endpointslices?watch=1",
            "/apis/node.k8s.io/v1/runtimeclasses/container",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2",
        ] {
            assert!(ok(Method::GET, p).await.is_ok(), "{p}");
        }
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/secrets/mine-env")
            .await
            .is_ok());
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/secrets/mine-vol")
            .await
            .is_ok());
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/configmaps/mine-cm")
            .await
            .is_ok());
        assert!(try_(Method::POST, "/api/v1/nodes", named("n2"))
            .await
            .is_ok());
        assert!(ok(Method::PATCH, "/api/v1/nodes/n2/status").await.is_ok());
        assert!(ok(Method::PATCH, "/api/v1/nodes/n2").await.is_ok());
        assert!(ok(
            Method::PUT,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2"
        )
        .await
        .is_ok());
        assert!(try_(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            named("n2")
        )
        .await
        .is_ok());
        assert!(ok(Method::PATCH, "/api/v1/namespaces/ns/pods/mine/status")
            .await
            .is_ok());
        assert!(ok(Method::DELETE, "/api/v1/namespaces/ns/pods/mine")
            .await
            .is_ok());
        assert!(ok(Method::POST, "/api/v1/namespaces/ns/events")
            .await
            .is_ok());
        assert!(
            try_(Method::POST, "/api/v1/namespaces", named("kube-node-lease"))
                .await
                .is_ok()
        );
        assert!(ok(Method::GET, "/version").await.is_ok());
        // Another node, its Lease, its pods and its secrets are not its
        // business; nor is any list of secrets.
        for (m, p, body) in [
            (
                Method::GET,
                "/api/v1/namespaces/ns/secrets/theirs-env",
                String::new(),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/ns/secrets/unused",
                String::new(),
            ),
            (Method::GET, "/api/v1/namespaces/ns/secrets", String::new()),
            (Method::GET, "/api/v1/secrets", String::new()),
            (Method::GET, "/api/v1/watch/secrets", String::new()),
            (
                Method::GET,
                "/api/v1/namespaces/ns/configmaps/theirs-cm",
                String::new(),
            ),
            (Method::GET, "/api/v1/configmaps", String::new()),
            // Pods: only its own, and lists only scoped to it.
            (Method::GET, "/api/v1/pods", String::new()),
            (
                Method::GET,
                "/api/v1/pods?fieldSelector=spec.nodeName%3Dn3",
                String::new(),
            ),
            (
                Method::GET,
                "/api/v1/pods?fieldSelector=spec.nodeName%21%3Dn2",
                String::new(),
            ),
            (
                Method::GET,
                "/api/v1/pods?labelSelector=spec.nodeName%3Dn2",
                String::new(),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/ns/pods/theirs",
                String::new(),
            ),
            // What a node has no use for.
            (
                Method::GET,
                "/apis/apps/v1/namespaces/ns/deployments",
                String::new(),
            ),
            (Method::GET, "/apis/apps/v1/replicasets", String::new()),
            (Method::GET, "/api/v1/namespaces", String::new()),
            (Method::GET, "/api/v1/events", String::new()),
            (Method::GET, "/api/v1/serviceaccounts", String::new()),
            (
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n3",
                String::new(),
            ),
            (
                Method::GET,
                "/apis/coordination.k8s.io/v1/leases",
                String::new(),
            ),
            (Method::POST, "/api/v1/nodes", named("n3")),
            (Method::POST, "/api/v1/nodes", "not json: [".to_string()),
            (Method::PATCH, "/api/v1/nodes/n3/status", String::new()),
            (Method::PUT, "/api/v1/nodes/n3", String::new()),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n3",
                String::new(),
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/default/leases/n2",
                String::new(),
            ),
            (
                Method::PATCH,
                "/api/v1/namespaces/ns/pods/theirs/status",
                String::new(),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/ns/pods/theirs",
                String::new(),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/ns/pods/gone",
                String::new(),
            ),
            (Method::POST, "/api/v1/namespaces", named("default")),
        ] {
            let e = try_(m.clone(), p, body).await;
            assert!(e.is_err(), "{m} {p} was allowed");
        }
        let e = ok(Method::PATCH, "/api/v1/namespaces/ns/pods/theirs/status")
            .await
            .unwrap_err();
        assert!(e.contains("pod ns/theirs is not bound to node n2"), "{e}");
        // What no node may do.
        assert!(ok(Method::POST, "/api/v1/namespaces/ns/pods")
            .await
            .is_err());
        assert!(ok(Method::POST, "/api//v1/namespaces/ns//pods")
            .await
            .is_err());
        assert!(ok(Method::POST, "/api/v1/watch/namespaces/ns/pods")
            .await
            .is_err());
        assert!(ok(Method::POST, "/apis/apps/v1").await.is_err());
        assert!(ok(Method::PATCH, "/api/v1/namespaces/ns/pods/mine")
            .await
            .is_err());
        assert!(ok(Method::POST, "/apis/apps/v1/namespaces/ns/deployments")
            .await
            .is_err());
        assert!(ok(Method::PUT, "/api/v1/namespaces/ns/secrets/s")
            .await
            .is_err());
        assert!(ok(Method::DELETE, "/api/v1/nodes/n2").await.is_err());
        assert!(ok(Method::DELETE, "/api/v1/namespaces/ns").await.is_err());
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/pods/mine/exec")
            .await
            .is_err());
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/pods/mine/log")
            .await
            .is_err());
        assert!(ok(Method::GET, "/api/v1/nodes/n2/proxy/logs")
            .await
            .is_err());
        let e = ok(Method::POST, "/api/v1/namespaces/ns/pods")
            .await
            .unwrap_err();
        assert_eq!(
            e,
            "node n2 may not post resource \"pods\" in API group \"\""
        );
        // Admins may do anything; the join secret nothing but joining.
        for (who, allowed) in [(Identity::Admin, true), (Identity::Bootstrap, false)] {
            for (m, p) in [
                (Method::POST, "/api/v1/namespaces/ns/pods"),
                (Method::GET, "/api/v1/namespaces/ns/pods/p/exec"),
                (Method::GET, "/api/v1/nodes"),
            ] {
                assert_eq!(
                    authorize(&state, &who, &m, p, None, b"").await.is_ok(),
                    allowed,
                    "{who:?} {m} {p}"
                );
            }
        }
    }

    #[test]
    fn a_node_may_set_only_kubelet_labels_under_kubernetes_io_and_never_node_restriction_ones() {
        for allowed in [
            "kubernetes.io/hostname",
            "kubernetes.io/arch",
            "topology.kubernetes.io/zone",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/exclude-from-external-load-balancers",
            "kubelet.kubernetes.io/anything",
            "foo.kubelet.kubernetes.io/x",
            "evoke.test/pool",
            "example.com/role",
            "plain",
            "notkubernetes.io/x",
        ] {
            assert!(!node_may_not_set_label(allowed), "{allowed}");
        }
        for forbidden in [
            "node-restriction.kubernetes.io/dedicated",
            "foo.node-restriction.kubernetes.io/x",
            "node-role.kubernetes.io/control-plane",
            "kubernetes.io/role",
            "k8s.io/x",
            "example.k8s.io/x",
            "x.kubernetes.io/y",
        ] {
            assert!(node_may_not_set_label(forbidden), "{forbidden}");
        }
    }

    #[test]
    fn node_restriction_refuses_protected_label_changes_and_taint_updates_by_the_node() {
        let node = |labels: Value, taints: Value| {
            serde_json::json!({"metadata": {"name": "n2", "labels": labels},
                "spec": {"taints": taints}})
        };
        let base = node(
            serde_json::json!({"kubernetes.io/hostname": "n2",
                "node-restriction.kubernetes.io/pool": "a"}),
            serde_json::json!([]),
        );
        // Registering with a protected label, or a role, is refused...
        let e = admit_node_object("n2", None, &base).unwrap_err();
        assert_eq!(
            e,
            "node \"n2\" is not allowed to modify labels: node-restriction.kubernetes.io/pool"
        );
        let with_role = node(
            serde_json::json!({"node-role.kubernetes.io/master": "true"}),
            Value::Null,
        );
        assert!(admit_node_object("n2", None, &with_role).is_err());
        // ...registering with taints and its own labels is not.
        let fresh = node(
            serde_json::json!({"kubernetes.io/hostname": "n2", "evoke.test/pool": "x"}),
            serde_json::json!([{"key": "k", "effect": "NoSchedule"}]),
        );
        assert!(admit_node_object("n2", None, &fresh).is_ok());
        // An admin's protected label stays as it is through the node's
        // updates, which may change its other labels...
        let mut changed = base.clone();
        changed["metadata"]["labels"]["evoke.test/pool"] = "y".into();
        assert!(admit_node_object("n2", Some(&base), &changed).is_ok());
        // ...but not change or remove it, nor touch taints.
        let mut edited = base.clone();
        edited["metadata"]["labels"]["node-restriction.kubernetes.io/pool"] = "b".into();
        assert!(admit_node_object("n2", Some(&base), &edited).is_err());
        let mut removed = base.clone();
        removed["metadata"]["labels"] = serde_json::json!({"kubernetes.io/hostname": "n2"});
        assert!(admit_node_object("n2", Some(&base), &removed).is_err());
        let mut untainted = node(serde_json::json!({}), Value::Null);
        let tainted = node(
            serde_json::json!({}),
            serde_json::json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]),
        );
        let e = admit_node_object("n2", Some(&tainted), &untainted).unwrap_err();
        assert_eq!(e, "node \"n2\" is not allowed to modify taints");
        assert!(admit_node_object("n2", Some(&untainted), &tainted).is_err());
        // An empty list is no taints.
        untainted["spec"]["taints"] = serde_json::json!([]);
        assert!(admit_node_object(
            "n2",
            Some(&node(serde_json::json!({}), Value::Null)),
            &untainted
        )
        .is_ok());
    }
}
