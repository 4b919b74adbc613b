//! Filters: may this pod run on this node? Each returns the reason it may
//! not, worded as kube-scheduler words it in FailedScheduling events.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

use crate::cache::NodeInfo;
use crate::resources::Resources;

/// Why a node was filtered out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unfit {
    Unschedulable,
    InsufficientCpu,
    InsufficientMemory,
    TooManyPods,
    NodeSelectorMismatch,
    UntoleratedTaint(String),
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::Unschedulable => write!(f, "node(s) were unschedulable"),
            Unfit::InsufficientCpu => write!(f, "Insufficient cpu"),
            Unfit::InsufficientMemory => write!(f, "Insufficient memory"),
            Unfit::TooManyPods => write!(f, "Too many pods"),
            Unfit::NodeSelectorMismatch => {
                write!(f, "node(s) didn't match Pod's node affinity/selector")
            }
            Unfit::UntoleratedTaint(t) => write!(f, "node(s) had untolerated taint {{{t}}}"),
        }
    }
}

/// The taint an unschedulable (cordoned) node implicitly carries.
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// Runs every filter; the first failure is returned.
pub fn fits(pod: &Pod, req: &Resources, info: &NodeInfo) -> Result<(), Unfit> {
    let node = &info.node;
    let tolerations: &[Toleration] = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        let t = Taint {
            key: TAINT_UNSCHEDULABLE.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        if !tolerations.iter().any(|tol| tolerates(tol, &t)) {
            return Err(Unfit::Unschedulable);
        }
    }
    check_taints(node, tolerations)?;
    if !matches_node_selector(pod, node) {
        return Err(Unfit::NodeSelectorMismatch);
    }
    check_resources(req, info)
}

/// Requests must fit into allocatable minus what bound pods already asked for.
pub fn check_resources(req: &Resources, info: &NodeInfo) -> Result<(), Unfit> {
    let free_pods = info.allocatable.pods - info.requested.pods;
    if info.allocatable.pods > 0 && free_pods < req.pods {
        return Err(Unfit::TooManyPods);
    }
    if req.cpu_milli > 0 && info.allocatable.cpu_milli - info.requested.cpu_milli < req.cpu_milli {
        return Err(Unfit::InsufficientCpu);
    }
    if req.memory > 0 && info.allocatable.memory - info.requested.memory < req.memory {
        return Err(Unfit::InsufficientMemory);
    }
    Ok(())
}

/// NoSchedule and NoExecute taints must be tolerated; PreferNoSchedule only
/// affects scores.
pub fn check_taints(node: &Node, tolerations: &[Toleration]) -> Result<(), Unfit> {
    for t in node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or(&[])
    {
        if t.effect != "NoSchedule" && t.effect != "NoExecute" {
            continue;
        }
        if !tolerations.iter().any(|tol| tolerates(tol, t)) {
            let v = t
                .value
                .as_deref()
                .map(|v| format!("={v}"))
                .unwrap_or_default();
            return Err(Unfit::UntoleratedTaint(format!(
                "{}{v}: {}",
                t.key, t.effect
            )));
        }
    }
    Ok(())
}

/// Whether one toleration tolerates one taint (key, operator, value, effect).
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = tol.effect.as_deref() {
        if !effect.is_empty() && effect != taint.effect {
            return false;
        }
    }
    let key = tol.key.as_deref().unwrap_or("");
    let op = tol.operator.as_deref().unwrap_or("Equal");
    if key.is_empty() {
        // An empty key with Exists tolerates everything.
        return op == "Exists";
    }
    if key != taint.key {
        return false;
    }
    match op {
        "Exists" => true,
        "Equal" => tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        _ => false,
    }
}

/// nodeSelector labels and required node affinity terms.
pub fn matches_node_selector(pod: &Pod, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    if let Some(sel) = spec.node_selector.as_ref() {
        if sel.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return false;
        }
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        // Terms are ORed; an empty term list matches nothing.
        Some(sel) => sel
            .node_selector_terms
            .iter()
            .any(|term| term_matches(term, labels, node.metadata.name.as_deref().unwrap_or(""))),
        None => true,
    }
}

fn term_matches(
    term: &NodeSelectorTerm,
    labels: &BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            let v = (r.key == "metadata.name").then_some(node_name);
            requirement_matches(r, v)
        })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::pod_requests;
    use serde_json::json;

    fn node(v: serde_json::Value) -> NodeInfo {
        NodeInfo::new(serde_json::from_value(v).expect("valid node"))
    }
    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("valid pod")
    }
    fn basic_node(name: &str) -> serde_json::Value {
        json!({"metadata": {"name": name, "labels": {"zone": "a", "gen": "5"}},
               "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"}}})
    }

    #[test]
    fn pod_requesting_more_cpu_than_free_is_rejected() {
        let n = node(basic_node("n1"));
        let p = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "3"}}}]}}),
        );
        assert_eq!(fits(&p, &pod_requests(&p), &n), Err(Unfit::InsufficientCpu));
        let p = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}}}]}}),
        );
        assert_eq!(fits(&p, &pod_requests(&p), &n), Ok(()));
    }

    #[test]
    fn already_bound_requests_reduce_free_capacity() {
        let mut n = node(basic_node("n1"));
        n.requested = Resources {
            cpu_milli: 0,
            memory: 3 << 30,
            pods: 1,
        };
        let p = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "2Gi"}}}]}}),
        );
        assert_eq!(
            fits(&p, &pod_requests(&p), &n),
            Err(Unfit::InsufficientMemory)
        );
    }

    #[test]
    fn full_node_rejects_with_too_many_pods() {
        let mut n = node(basic_node("n1"));
        n.requested.pods = 110;
        let p = pod(json!({"spec": {"containers": [{"name": "c"}]}}));
        assert_eq!(fits(&p, &pod_requests(&p), &n), Err(Unfit::TooManyPods));
    }

    #[test]
    fn node_selector_must_match_labels() {
        let n = node(basic_node("n1"));
        let p =
            pod(json!({"spec": {"nodeSelector": {"zone": "b"}, "containers": [{"name": "c"}]}}));
        assert_eq!(
            fits(&p, &pod_requests(&p), &n),
            Err(Unfit::NodeSelectorMismatch)
        );
        let p =
            pod(json!({"spec": {"nodeSelector": {"zone": "a"}, "containers": [{"name": "c"}]}}));
        assert_eq!(fits(&p, &pod_requests(&p), &n), Ok(()));
    }

    #[test]
    fn required_node_affinity_supports_all_operators_and_ors_terms() {
        let n = node(basic_node("n1"));
        let with = |terms: serde_json::Value| {
            pod(
                json!({"spec": {"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}}),
            )
        };
        let ok = |p: &Pod| matches_node_selector(p, &n.node);
        assert!(ok(&with(
            json!([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}])
        )));
        assert!(!ok(&with(
            json!([{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}])
        )));
        assert!(ok(&with(
            json!([{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}])
        )));
        assert!(ok(&with(
            json!([{"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}])
        )));
        assert!(ok(&with(
            json!([{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]}])
        )));
        assert!(!ok(&with(
            json!([{"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["4"]}]}])
        )));
        assert!(ok(&with(
            json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}])
        )));
        // Terms are ORed, expressions within a term ANDed.
        assert!(ok(&with(json!([
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}, {"key": "gen", "operator": "Exists"}]}
        ]))));
        assert!(!ok(&with(json!([]))));
    }

    #[test]
    fn taints_need_matching_tolerations() {
        let mut v = basic_node("n1");
        v["spec"] = json!({"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"},
                                      {"key": "soft", "effect": "PreferNoSchedule"}]});
        let n = node(v);
        let p = pod(json!({"spec": {"containers": [{"name": "c"}]}}));
        assert!(matches!(
            fits(&p, &pod_requests(&p), &n),
            Err(Unfit::UntoleratedTaint(_))
        ));
        let p = pod(
            json!({"spec": {"containers": [{"name": "c"}], "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(fits(&p, &pod_requests(&p), &n), Ok(()));
        let p = pod(
            json!({"spec": {"containers": [{"name": "c"}], "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "web"}]}}),
        );
        assert!(fits(&p, &pod_requests(&p), &n).is_err());
        let p = pod(
            json!({"spec": {"containers": [{"name": "c"}], "tolerations": [{"operator": "Exists"}]}}),
        );
        assert_eq!(fits(&p, &pod_requests(&p), &n), Ok(()));
    }

    #[test]
    fn cordoned_node_is_skipped_unless_tolerated() {
        let mut v = basic_node("n1");
        v["spec"] = json!({"unschedulable": true});
        let n = node(v);
        let p = pod(json!({"spec": {"containers": [{"name": "c"}]}}));
        assert_eq!(fits(&p, &pod_requests(&p), &n), Err(Unfit::Unschedulable));
        let p = pod(
            json!({"spec": {"containers": [{"name": "c"}], "tolerations": [
            {"key": TAINT_UNSCHEDULABLE, "operator": "Exists", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(fits(&p, &pod_requests(&p), &n), Ok(()));
    }
}
