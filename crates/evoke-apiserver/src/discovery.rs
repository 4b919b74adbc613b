//! Discovery: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/<g>/<v>`, and
//! the aggregated discovery documents kubectl 1.32 asks for first. All of it
//! is generated from the registry.

use evoke_types::registry::{self, Resource, RESOURCES};
use serde_json::{json, Value};

use crate::respond::{self, Reply};

/// The Kubernetes version evoke speaks.
pub(crate) const KUBE_MINOR: &str = "32";

pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBE_MINOR,
        "gitVersion": format!("v1.{KUBE_MINOR}.0-evoke.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, "amd64"),
    })
}

/// Verbs of a main resource.
fn verbs(res: &Resource) -> Vec<&'static str> {
    if res.kind == "Binding" {
        return vec!["create"];
    }
    let mut v = vec![
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    if res.kind != "Namespace" {
        v.insert(1, "deletecollection");
    }
    v
}

fn sub_verbs(sub: &str) -> Vec<&'static str> {
    match sub {
        "binding" | "eviction" => vec!["create"],
        "status" | "scale" => vec!["get", "patch", "update"],
        "finalize" => vec!["update"],
        "log" => vec!["get"],
        _ => vec!["create", "get"],
    }
}

fn sub_kind(res: &Resource, sub: &str) -> (&'static str, &'static str, &'static str) {
    match sub {
        "scale" => ("autoscaling", "v1", "Scale"),
        "binding" => ("", "v1", "Binding"),
        "eviction" => ("policy", "v1", "Eviction"),
        "log" | "exec" | "attach" | "portforward" => ("", "v1", "Pod"),
        _ => (res.group, res.version, res.kind),
    }
}

fn served<'a>(group: &'a str, version: &'a str) -> impl Iterator<Item = &'static Resource> + 'a {
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

/// `APIResourceList` for one group version, or None if not served.
pub(crate) fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in served(group, version) {
        let mut e = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": verbs(r),
        });
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        resources.push(e);
        for s in r.subresources {
            let (g, v, k) = sub_kind(r, s);
            let mut e = json!({
                "name": format!("{}/{s}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": k,
                "verbs": sub_verbs(s),
            });
            if g != r.group {
                e["group"] = g.into();
                e["version"] = v.into();
            }
            resources.push(e);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn versions_of(group: &str) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !v.contains(&r.version) {
            v.push(r.version);
        }
    }
    v
}

pub(crate) fn api_group(group: &str) -> Option<Value> {
    let versions: Vec<Value> = versions_of(group)
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let first = versions.first()?.clone();
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions, "preferredVersion": first}),
    )
}

/// Whether the client asks for the aggregated discovery format, and which
/// apiVersion of it.
fn aggregated_version(accept: &str) -> Option<&'static str> {
    for alt in accept.split(',') {
        let params: Vec<&str> = alt.split(';').map(str::trim).collect();
        let has = |p: &str| params.contains(&p);
        if has("g=apidiscovery.k8s.io") && has("as=APIGroupDiscoveryList") {
            if has("v=v2") {
                return Some("v2");
            }
            if has("v=v2beta1") {
                return Some("v2beta1");
            }
        }
    }
    None
}

fn aggregated_resource(r: &Resource) -> Value {
    let mut e = json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": verbs(r),
    });
    if !r.short_names.is_empty() {
        e["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        e["categories"] = json!(r.categories);
    }
    let subs: Vec<Value> = r
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k) = sub_kind(r, s);
            json!({"subresource": s, "responseKind": {"group": g, "version": v, "kind": k}, "verbs": sub_verbs(s)})
        })
        .collect();
    if !subs.is_empty() {
        e["subresources"] = subs.into();
    }
    e
}

fn aggregated_group(group: &str) -> Value {
    let versions: Vec<Value> = versions_of(group)
        .iter()
        .map(|v| {
            let resources: Vec<Value> = served(group, v).map(aggregated_resource).collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": versions})
}

fn aggregated(api_version: &str, groups: &[&str]) -> Reply {
    let items: Vec<Value> = groups.iter().map(|g| aggregated_group(g)).collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{api_version}"),
        "metadata": {},
        "items": items,
    });
    respond::full(
        200,
        &format!("application/json;g=apidiscovery.k8s.io;v={api_version};as=APIGroupDiscoveryList"),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// `/api`: the legacy APIVersions, or the aggregated core group.
pub(crate) fn api(accept: &str, server_address: &str) -> Reply {
    if let Some(v) = aggregated_version(accept) {
        return aggregated(v, &[""]);
    }
    respond::json(
        200,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }),
    )
}

/// `/apis`: the APIGroupList, or every named group aggregated.
pub(crate) fn apis(accept: &str) -> Reply {
    let groups = registry::groups();
    if let Some(v) = aggregated_version(accept) {
        return aggregated(v, &groups);
    }
    let list: Vec<Value> = groups.iter().filter_map(|g| api_group(g)).collect();
    respond::json(
        200,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_accept_header_selects_aggregated_v2() {
        let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(accept), Some("v2"));
        assert_eq!(aggregated_version("application/json"), None);
    }

    #[test]
    fn core_resource_list_has_pods_with_their_subresources() {
        let l = resource_list("", "v1").expect("core served");
        let names: Vec<&str> = l["resources"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(
            names.contains(&"pods")
                && names.contains(&"pods/status")
                && names.contains(&"namespaces")
        );
        assert!(resource_list("apps", "v2").is_none());
        let scale = resource_list("apps", "v1").expect("apps");
        let s = scale["resources"]
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["name"] == "deployments/scale")
            .expect("scale");
        assert_eq!(s["group"], "autoscaling");
    }
}
