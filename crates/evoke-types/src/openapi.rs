//! OpenAPI documents for kubectl: `/openapi/v2` (Swagger 2.0) and
//! `/openapi/v3` with one document per group-version. kubectl 1.32 reads v3
//! for `kubectl explain`, for strategic-merge metadata in `kubectl apply`
//! (`x-kubernetes-patch-merge-key`/`-strategy` on fields), and to learn that
//! the server validates fields itself (the `fieldValidation` parameter on a
//! PATCH operation carrying the kind's `x-kubernetes-group-version-kind`).
//!
//! The schemas come from [`crate::schema::definitions`], so what is served
//! is what evoke validates and merges with. Documents are built once.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use crate::registry::{Resource, RESOURCES};
use crate::schema::{def_name, definitions};

/// The Kubernetes version evoke's API imitates, as OpenAPI `info.version`.
pub const KUBE_VERSION: &str = "v1.32.0";

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.";

/// The Swagger 2.0 document (`/openapi/v2`, JSON). kubectl asks for it as
/// protobuf first; the server should answer that with 406 so it falls back.
pub fn v2() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build_v2)
}

/// `/openapi/v3`: each group-version's document path with a content hash,
/// as `{"paths":{"api/v1":{"serverRelativeURL":"/openapi/v3/api/v1?hash=.."}}}`.
pub fn v3_index() -> Value {
    let mut paths = Map::new();
    for (name, _, _) in group_versions() {
        let hash = v3(&name)
            .map(|d| fnv_hex(d.to_string().as_bytes()))
            .unwrap_or_default();
        paths.insert(
            name.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{name}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

/// The OpenAPI 3.0 document of one group-version: `api/v1` or
/// `apis/apps/v1` (as the index names them; `v1` and `apps/v1` work too).
/// `None` for a group-version evoke does not serve.
pub fn v3(group_version: &str) -> Option<&'static Value> {
    static DOCS: OnceLock<Vec<(String, Value)>> = OnceLock::new();
    let docs = DOCS.get_or_init(|| {
        group_versions()
            .into_iter()
            .map(|(name, g, v)| {
                let doc = build_v3(g, v);
                (name, doc)
            })
            .collect()
    });
    let gv = group_version.trim_matches('/');
    let name = if gv.starts_with("api/") || gv.starts_with("apis/") {
        gv.to_string()
    } else if gv.contains('/') {
        format!("apis/{gv}")
    } else {
        format!("api/{gv}")
    };
    docs.iter().find(|(n, _)| *n == name).map(|(_, d)| d)
}

/// Served group-versions as OpenAPI v3 names them, with group and version.
fn group_versions() -> Vec<(String, &'static str, &'static str)> {
    let mut out: Vec<(String, &'static str, &'static str)> = Vec::new();
    for r in RESOURCES {
        let name = if r.group.is_empty() {
            format!("api/{}", r.version)
        } else {
            format!("apis/{}/{}", r.group, r.version)
        };
        if !out.iter().any(|(n, _, _)| *n == name) {
            out.push((name, r.group, r.version));
        }
    }
    out
}

/// FNV-1a, as a stable content hash for the v3 index (clients cache by it).
fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

fn all_defs() -> Map<String, Value> {
    let mut defs = definitions().clone();
    defs.insert(
        format!("{META}Patch"),
        json!({"description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.", "type": "object"}),
    );
    defs
}

/// The names of every definition reachable from `roots`.
fn reachable(defs: &Map<String, Value>, roots: &[String]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(d) = defs.get(&name) {
            collect_refs(d, &mut todo);
        }
    }
    seen.retain(|n| defs.contains_key(n));
    seen
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Some(name) = x.as_str().and_then(|r| r.rsplit('/').next()) {
                        out.push(name.to_string());
                    }
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(l) => l.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// Rewrites `#/definitions/X` refs for v3, and wraps a `$ref` that has
/// sibling keys into `allOf: [{$ref}]` as kube-apiserver's v3 does (OpenAPI
/// 3.0 ignores siblings of `$ref`).
fn to_v3_schema(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                if k == "$ref" {
                    let r = x
                        .as_str()
                        .unwrap_or_default()
                        .replace("#/definitions/", "#/components/schemas/");
                    out.insert(k.clone(), Value::String(r));
                } else {
                    out.insert(k.clone(), to_v3_schema(x));
                }
            }
            if out.len() > 1 {
                if let Some(r) = out.remove("$ref") {
                    out.insert("allOf".into(), json!([{"$ref": r}]));
                    if !out.contains_key("default") && !out.contains_key("x-kubernetes-list-type") {
                        out.insert("default".into(), json!({}));
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(l) => Value::Array(l.iter().map(to_v3_schema).collect()),
        other => other.clone(),
    }
}

fn resources_of(group: &str, version: &str) -> Vec<&'static Resource> {
    RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect()
}

fn build_v3(group: &str, version: &str) -> Value {
    let defs = all_defs();
    let mut roots: Vec<String> = vec![
        format!("{META}Status"),
        format!("{META}DeleteOptions"),
        format!("{META}Patch"),
        format!("{META}WatchEvent"),
        format!("{META}APIResourceList"),
    ];
    for r in resources_of(group, version) {
        roots.push(def_name(r));
        roots.push(format!("{}List", def_name(r)));
        if r.subresources.contains(&"scale") {
            roots.push("io.k8s.api.autoscaling.v1.Scale".into());
        }
        if r.subresources.contains(&"eviction") {
            roots.push("io.k8s.api.policy.v1.Eviction".into());
        }
    }
    let mut schemas = Map::new();
    for name in reachable(&defs, &roots) {
        if let Some(d) = defs.get(&name) {
            schemas.insert(name, to_v3_schema(d));
        }
    }
    let mut paths = Map::new();
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    for r in resources_of(group, version) {
        add_paths(&mut paths, &prefix, r, true);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBE_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

fn build_v2() -> Value {
    let defs = all_defs();
    let mut paths = Map::new();
    for r in RESOURCES {
        let prefix = if r.group.is_empty() {
            format!("/api/{}", r.version)
        } else {
            format!("/apis/{}/{}", r.group, r.version)
        };
        add_paths(&mut paths, &prefix, r, false);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": KUBE_VERSION},
        "paths": paths,
        "definitions": defs,
    })
}

/// The REST operations of one resource, with the parameters, request
/// bodies and the group-version-kind extension kubectl looks for.
fn add_paths(paths: &mut Map<String, Value>, prefix: &str, r: &Resource, v3: bool) {
    let def = def_name(r);
    let gvk = json!({"group": r.group, "kind": r.kind, "version": r.version});
    let base = if r.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("{prefix}/{}", r.plural)
    };
    let refer = |name: &str| {
        if v3 {
            json!({"$ref": format!("#/components/schemas/{name}")})
        } else {
            json!({"$ref": format!("#/definitions/{name}")})
        }
    };
    let param = |name: &str, location: &str, desc: &str| {
        if v3 {
            json!({"name": name, "in": location, "description": desc, "required": location == "path", "schema": {"type": "string", "uniqueItems": true}})
        } else {
            json!({"name": name, "in": location, "description": desc, "required": location == "path", "type": "string", "uniqueItems": true})
        }
    };
    let dry_run = param("dryRun", "query", "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed");
    let field_manager = param(
        "fieldManager",
        "query",
        "fieldManager is a name associated with the actor or entity that is making these changes.",
    );
    let field_validation = param("fieldValidation", "query", "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict");
    let force = if v3 {
        json!({"name": "force", "in": "query", "description": "Force is going to \"force\" Apply requests.", "schema": {"type": "boolean", "uniqueItems": true}})
    } else {
        json!({"name": "force", "in": "query", "description": "Force is going to \"force\" Apply requests.", "type": "boolean", "uniqueItems": true})
    };
    let write_params = json!([dry_run, field_manager, field_validation]);
    let patch_params = json!([dry_run, field_manager, field_validation, force]);
    let ok = |schema: Value| {
        if v3 {
            json!({"200": {"description": "OK", "content": {"application/json": {"schema": schema}, "application/yaml": {"schema": schema}}}, "401": {"description": "Unauthorized"}})
        } else {
            json!({"200": {"description": "OK", "schema": schema}, "401": {"description": "Unauthorized"}})
        }
    };
    let body = |schema: Value, types: &[&str]| -> Value {
        let mut content = Map::new();
        for t in types {
            content.insert((*t).to_string(), json!({"schema": schema}));
        }
        json!({"content": content, "required": true})
    };
    let kind_words = r.kind;
    let id = |verb: &str, suffix: &str| {
        // kube's ids: readCoreV1NamespacedPodStatus, listAppsV1DeploymentForAllNamespaces.
        let all = suffix == "ForAllNamespaces";
        let scope = if r.namespaced && !all {
            "Namespaced"
        } else {
            ""
        };
        let gv = if r.group.is_empty() {
            format!("Core{}", capitalize(r.version))
        } else {
            format!(
                "{}{}",
                capitalize(r.group.split('.').next().unwrap_or_default()),
                capitalize(r.version)
            )
        };
        format!("{verb}{gv}{scope}{kind_words}{suffix}")
    };
    let op = |verb: &str,
              action: &str,
              desc: String,
              params: &Value,
              response: Value,
              request: Option<Value>| {
        // "read:Status" names the verb and the operation id's suffix.
        let (verb, suffix) = verb.split_once(':').unwrap_or((verb, ""));
        let mut o = Map::new();
        o.insert("description".into(), json!(desc));
        o.insert("operationId".into(), json!(id(verb, suffix)));
        o.insert("tags".into(), json!([tag(r)]));
        if !params.as_array().is_none_or(Vec::is_empty) {
            o.insert("parameters".into(), params.clone());
        }
        if let Some(schema) = request {
            if v3 {
                let types: &[&str] = if verb == "patch" {
                    &[
                        "application/apply-patch+yaml",
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/strategic-merge-patch+json",
                    ]
                } else {
                    &["*/*"]
                };
                o.insert("requestBody".into(), body(schema, types));
            } else {
                let mut ps = params.as_array().cloned().unwrap_or_default();
                ps.insert(
                    0,
                    json!({"name": "body", "in": "body", "required": true, "schema": schema}),
                );
                o.insert("parameters".into(), Value::Array(ps));
            }
        }
        if !v3 {
            let consumes = if verb == "patch" {
                json!([
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                    "application/apply-patch+yaml"
                ])
            } else {
                json!(["*/*"])
            };
            o.insert("consumes".into(), consumes);
            o.insert(
                "produces".into(),
                json!(["application/json", "application/yaml"]),
            );
            o.insert("schemes".into(), json!(["https"]));
        }
        o.insert("responses".into(), ok(response));
        o.insert("x-kubernetes-action".into(), json!(action));
        o.insert("x-kubernetes-group-version-kind".into(), gvk.clone());
        Value::Object(o)
    };
    let none = json!([]);
    let mut path_params = vec![];
    if r.namespaced {
        path_params.push(param(
            "namespace",
            "path",
            "object name and auth scope, such as for teams and projects",
        ));
    }
    let pretty = param(
        "pretty",
        "query",
        "If 'true', then the output is pretty printed.",
    );
    let mut coll_params = path_params.clone();
    coll_params.push(pretty.clone());
    let mut item_params = vec![param("name", "path", &format!("name of the {}", r.kind))];
    item_params.extend(path_params.clone());
    item_params.push(pretty);

    if r.kind != "Binding" {
        paths.insert(
            base.clone(),
            json!({
                "get": op("list", "list", format!("list or watch objects of kind {}", r.kind), &none, refer(&format!("{def}List")), None),
                "post": op("create", "post", format!("create a {}", r.kind), &write_params, refer(&def), Some(refer(&def))),
                "delete": op("deleteCollection", "deletecollection", format!("delete collection of {}", r.kind), &none, refer(&format!("{META}Status")), None),
                "parameters": coll_params,
            }),
        );
    } else {
        paths.insert(
            base.clone(),
            json!({
                "post": op("create", "post", "create a Binding".into(), &write_params, refer(&def), Some(refer(&def))),
                "parameters": coll_params,
            }),
        );
        return;
    }
    paths.insert(
        format!("{base}/{{name}}"),
        json!({
            "get": op("read", "get", format!("read the specified {}", r.kind), &none, refer(&def), None),
            "put": op("replace", "put", format!("replace the specified {}", r.kind), &write_params, refer(&def), Some(refer(&def))),
            "patch": op("patch", "patch", format!("partially update the specified {}", r.kind), &patch_params, refer(&def), Some(refer(&format!("{META}Patch")))),
            "delete": op("delete", "delete", format!("delete a {}", r.kind), &none, refer(&format!("{META}Status")), None),
            "parameters": item_params,
        }),
    );
    if r.subresources.contains(&"status") {
        paths.insert(
            format!("{base}/{{name}}/status"),
            json!({
                "get": op("read:Status", "get", format!("read status of the specified {}", r.kind), &none, refer(&def), None),
                "put": op("replace:Status", "put", format!("replace status of the specified {}", r.kind), &write_params, refer(&def), Some(refer(&def))),
                "patch": op("patch:Status", "patch", format!("partially update status of the specified {}", r.kind), &patch_params, refer(&def), Some(refer(&format!("{META}Patch")))),
                "parameters": item_params,
            }),
        );
    }
    if r.namespaced {
        paths.insert(
            format!("{prefix}/{}", r.plural),
            json!({"get": op("list:ForAllNamespaces", "list", format!("list or watch objects of kind {}", r.kind), &none, refer(&format!("{def}List")), None)}),
        );
    }
}

fn tag(r: &Resource) -> String {
    let g = if r.group.is_empty() {
        "core"
    } else {
        r.group.split('.').next().unwrap_or(r.group)
    };
    format!("{g}_{}", r.version)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v3_index_lists_every_served_group_version_with_a_hash() {
        let idx = v3_index();
        let paths = idx["paths"].as_object().expect("paths");
        for name in [
            "api/v1",
            "apis/apps/v1",
            "apis/node.k8s.io/v1",
            "apis/coordination.k8s.io/v1",
            "apis/discovery.k8s.io/v1",
        ] {
            let url = paths[name]["serverRelativeURL"].as_str().expect("url");
            assert!(
                url.starts_with(&format!("/openapi/v3/{name}?hash=")),
                "{url}"
            );
        }
        assert_eq!(v3_index(), idx, "the hash is stable");
    }

    #[test]
    fn v3_documents_are_found_by_every_spelling() {
        assert!(v3("apis/apps/v1").is_some());
        assert!(v3("apps/v1").is_some());
        assert!(v3("api/v1").is_some());
        assert!(v3("v1").is_some());
        assert!(v3("apis/batch/v1").is_none());
    }

    #[test]
    fn v3_schemas_carry_kinds_and_merge_keys_for_kubectl() {
        let doc = v3("api/v1").expect("core");
        let schemas = &doc["components"]["schemas"];
        let pod = &schemas["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        let containers = &schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(containers["x-kubernetes-patch-strategy"], "merge");
        assert_eq!(
            containers["items"]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.Container"
        );
        // A $ref with a description is wrapped, since OpenAPI 3.0 ignores $ref siblings.
        let spec = &pod["properties"]["spec"];
        assert_eq!(
            spec["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.PodSpec"
        );
        assert!(spec["description"].is_string());
        assert!(
            schemas.get("io.k8s.api.apps.v1.Deployment").is_none(),
            "only this group-version's kinds"
        );
        let text = doc.to_string();
        assert!(
            !text.contains("#/definitions/"),
            "every ref points into components"
        );
    }

    #[test]
    fn every_ref_in_every_document_resolves() {
        let mut docs: Vec<(&Value, &str, &Value)> =
            vec![(v2(), "#/definitions/", &v2()["definitions"])];
        for (name, _, _) in group_versions() {
            let d = v3(&name).expect("doc");
            docs.push((d, "#/components/schemas/", &d["components"]["schemas"]));
        }
        for (doc, prefix, defs) in docs {
            let mut refs = Vec::new();
            collect_ref_strings(doc, &mut refs);
            assert!(!refs.is_empty());
            for r in refs {
                let name = r
                    .strip_prefix(prefix)
                    .unwrap_or_else(|| panic!("{r} outside {prefix}"));
                assert!(defs.get(name).is_some(), "{r} does not resolve");
            }
        }
    }

    fn collect_ref_strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        out.push(x.as_str().unwrap_or_default().to_string());
                    } else {
                        collect_ref_strings(x, out);
                    }
                }
            }
            Value::Array(l) => l.iter().for_each(|x| collect_ref_strings(x, out)),
            _ => {}
        }
    }

    #[test]
    fn patch_operations_declare_field_validation_and_their_kind() {
        let doc = v3("apis/apps/v1").expect("apps");
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"],
            json!({"group":"apps","kind":"Deployment","version":"v1"})
        );
        let params: Vec<&str> = patch["parameters"]
            .as_array()
            .expect("params")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(params.contains(&"fieldValidation"));
        assert!(
            patch["requestBody"]["content"]["application/strategic-merge-patch+json"].is_object()
        );
        let v2doc = v2();
        assert_eq!(v2doc["swagger"], "2.0");
        assert!(v2doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"].is_object());
    }

    #[test]
    fn operation_ids_are_unique_and_read_like_kubes() {
        let mut ids = std::collections::HashSet::new();
        for item in v2()["paths"].as_object().expect("paths").values() {
            for (method, op) in item.as_object().expect("item") {
                if method == "parameters" {
                    continue;
                }
                let id = op["operationId"].as_str().expect("id").to_string();
                assert!(ids.insert(id.clone()), "duplicate operationId {id}");
            }
        }
        for id in [
            "readCoreV1NamespacedPodStatus",
            "listAppsV1DeploymentForAllNamespaces",
            "patchCoreV1Node",
            "createCoreV1NamespacedBinding",
        ] {
            assert!(ids.contains(id), "{id} missing");
        }
    }

    #[test]
    fn schemas_use_only_keywords_kubectl_parsers_accept() {
        const ALLOWED: &[&str] = &[
            "$ref",
            "additionalProperties",
            "allOf",
            "default",
            "description",
            "enum",
            "format",
            "items",
            "properties",
            "required",
            "title",
            "type",
            "maximum",
            "minimum",
            "pattern",
        ];
        fn check(v: &Value, path: &str) {
            let Some(m) = v.as_object() else { return };
            for (k, x) in m {
                if k.starts_with("x-") {
                    continue;
                }
                assert!(
                    ALLOWED.contains(&k.as_str()),
                    "unexpected keyword {k} at {path}"
                );
                if k == "type" {
                    assert!(x.is_string(), "type must be a single string at {path}");
                }
                match k.as_str() {
                    "properties" => {
                        for (pk, pv) in x.as_object().into_iter().flatten() {
                            check(pv, &format!("{path}.{pk}"));
                        }
                    }
                    "items" | "additionalProperties" => check(x, &format!("{path}[]")),
                    "allOf" => x
                        .as_array()
                        .into_iter()
                        .flatten()
                        .for_each(|s| check(s, path)),
                    _ => {}
                }
            }
        }
        for (name, d) in v2()["definitions"].as_object().expect("defs") {
            check(d, name);
        }
    }
}
