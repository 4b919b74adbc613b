//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
//! strategic merge patch as `kubectl apply` and `kubectl patch` send it.
//! Strategic merge reads list semantics from [`crate::schema`], the same
//! data [`crate::openapi`] serves, so the client and server agree.

use serde_json::{Map, Value};

use crate::decode;
use crate::registry::Resource;
use crate::schema::Schema;
use crate::status::ApiError;

/// The PATCH flavours kube-apiserver accepts, told apart by content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`: RFC 6902 operations.
    Json,
    /// `application/merge-patch+json`: RFC 7386.
    Merge,
    /// `application/strategic-merge-patch+json`: Kubernetes' own.
    StrategicMerge,
    /// `application/apply-patch+yaml`: server-side apply; see
    /// [`crate::apply::server_side_apply`].
    Apply,
}

impl PatchType {
    /// The patch type of a `Content-Type` (parameters ignored).
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media = content_type.split(';').next()?.trim().to_ascii_lowercase();
        match media.as_str() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }

    pub fn content_type(&self) -> &'static str {
        match self {
            PatchType::Json => "application/json-patch+json",
            PatchType::Merge => "application/merge-patch+json",
            PatchType::StrategicMerge => "application/strategic-merge-patch+json",
            PatchType::Apply => "application/apply-patch+yaml",
        }
    }
}

/// kube-apiserver refuses JSON patches with more operations than this.
const MAX_JSON_PATCH_OPS: usize = 10_000;

/// Applies `patch` to `current`, an object of kind `res`, and returns the
/// patched object (not yet defaulted or validated). `PatchType::Apply`
/// needs a field manager, so it is refused here: use
/// [`crate::apply::server_side_apply`].
pub fn apply_patch(
    res: &Resource,
    pt: PatchType,
    current: &Value,
    patch: &[u8],
) -> Result<Value, ApiError> {
    let out = match pt {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            if ops.0.len() > MAX_JSON_PATCH_OPS {
                return Err(ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    format!(
                        "the allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPS}, got {}",
                        ops.0.len()
                    ),
                ));
            }
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
            doc
        }
        PatchType::Merge => {
            let p: Value = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &p);
            doc
        }
        PatchType::StrategicMerge => {
            let p = decode::parse(patch, Some("application/json")).map_err(|e| {
                ApiError::bad_request(format!("error decoding patch: {}", e.message))
            })?;
            strategic_merge(res, current, &p)?
        }
        PatchType::Apply => {
            return Err(ApiError::bad_request(
                "apply patches must be handled by server-side apply with a field manager",
            ))
        }
    };
    if !out.is_object() {
        return Err(ApiError::bad_request(format!(
            "the patched {} is not an object",
            res.kind
        )));
    }
    Ok(out)
}

/// Strategic merge of a decoded `patch` into `current`.
pub fn strategic_merge(res: &Resource, current: &Value, patch: &Value) -> Result<Value, ApiError> {
    let Value::Object(p) = patch else {
        return Err(ApiError::bad_request(format!(
            "a strategic merge patch must be a JSON object, got {}",
            decode::type_name(patch)
        )));
    };
    let empty = Map::new();
    let cur = current.as_object().unwrap_or(&empty);
    match merge_map(cur, p, Schema::for_resource(res))? {
        Merged::Value(m) => Ok(Value::Object(m)),
        Merged::Delete => Ok(Value::Object(Map::new())),
    }
}

enum Merged {
    Value(Map<String, Value>),
    /// `$patch: delete`: the map is removed from its parent.
    Delete,
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER: &str = "$setElementOrder/";
const DELETE_PRIMITIVE: &str = "$deleteFromPrimitiveList/";

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

fn merge_map(
    orig: &Map<String, Value>,
    patch: &Map<String, Value>,
    schema: Schema,
) -> Result<Merged, ApiError> {
    match patch.get(DIRECTIVE) {
        None => {}
        Some(Value::String(d)) if d == "merge" => {}
        Some(Value::String(d)) if d == "delete" => return Ok(Merged::Delete),
        Some(Value::String(d)) if d == "replace" => {
            let mut m = patch.clone();
            m.remove(DIRECTIVE);
            return Ok(Merged::Value(strip_map(&m)?));
        }
        Some(other) => {
            return Err(bad(format!(
                "unknown patch type: {other} in map: {}",
                Value::Object(patch.clone())
            )))
        }
    }
    let mut out = orig.clone();
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    let mut deletes: Vec<(&str, &Vec<Value>)> = Vec::new();
    let mut retain: Option<Vec<&str>> = None;
    for (k, pv) in patch {
        if k == DIRECTIVE {
            continue;
        }
        if k == RETAIN_KEYS {
            let Value::Array(keys) = pv else {
                return Err(bad(format!(
                    "invalid $retainKeys: expected a list, got {pv}"
                )));
            };
            let mut list = Vec::new();
            for key in keys {
                let Value::String(s) = key else {
                    return Err(bad(format!("invalid $retainKeys entry: {key}")));
                };
                list.push(s.as_str());
            }
            retain = Some(list);
            continue;
        }
        if let Some(field) = k.strip_prefix(SET_ORDER) {
            let Value::Array(order) = pv else {
                return Err(bad(format!("invalid {k}: expected a list, got {pv}")));
            };
            orders.push((field, order));
            continue;
        }
        if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE) {
            let Value::Array(vals) = pv else {
                return Err(bad(format!("invalid {k}: expected a list, got {pv}")));
            };
            deletes.push((field, vals));
            continue;
        }
        let prop = schema.property(k);
        match pv {
            Value::Null => {
                out.remove(k);
            }
            Value::Object(pm) => {
                let base = match out.get(k) {
                    Some(Value::Object(o)) => o.clone(),
                    _ => Map::new(),
                };
                match merge_map(&base, pm, prop)? {
                    Merged::Value(m) => {
                        out.insert(k.clone(), Value::Object(m));
                    }
                    Merged::Delete => {
                        out.remove(k);
                    }
                }
            }
            Value::Array(pl) => {
                let merged = if prop.patch_strategies().contains(&"merge") {
                    let base = match out.get(k) {
                        Some(Value::Array(o)) => o.clone(),
                        _ => Vec::new(),
                    };
                    merge_list(&base, pl, prop)?
                } else {
                    strip_list(pl)?
                };
                out.insert(k.clone(), Value::Array(merged));
            }
            scalar => {
                out.insert(k.clone(), scalar.clone());
            }
        }
    }
    for (field, vals) in deletes {
        if let Some(Value::Array(list)) = out.get_mut(field) {
            list.retain(|x| !vals.contains(x));
        }
    }
    for (field, order) in orders {
        let key = schema.property(field).merge_key();
        if let Some(Value::Array(list)) = out.get_mut(field) {
            reorder(list, order, key);
        }
    }
    if let Some(keep) = retain {
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Merged::Value(out))
}

/// Sorts `list` into the order the client gave; items the client did not
/// name (added by someone else) keep their relative order, after them.
fn reorder(list: &mut Vec<Value>, order: &[Value], key: Option<&str>) {
    let ident = |v: &Value| -> Value {
        match key {
            Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
            None => v.clone(),
        }
    };
    let mut rest: Vec<Value> = std::mem::take(list);
    let mut sorted = Vec::with_capacity(rest.len());
    for o in order {
        let want = ident(o);
        if let Some(pos) = rest.iter().position(|x| ident(x) == want) {
            sorted.push(rest.remove(pos));
        }
    }
    sorted.extend(rest);
    *list = sorted;
}

fn merge_list(orig: &[Value], patch: &[Value], prop: Schema) -> Result<Vec<Value>, ApiError> {
    // `{"$patch": "replace"}` as an item replaces the whole list.
    let replace = patch
        .iter()
        .any(|i| i.get(DIRECTIVE).and_then(Value::as_str) == Some("replace"));
    if replace {
        let items: Vec<Value> = patch
            .iter()
            .filter(|i| i.get(DIRECTIVE).and_then(Value::as_str) != Some("replace"))
            .cloned()
            .collect();
        return strip_list(&items);
    }
    let key = prop.merge_key();
    let mut out = orig.to_vec();
    for item in patch {
        match (item, key) {
            (Value::Object(pm), Some(key)) => {
                let Some(kv) = pm.get(key) else {
                    return Err(bad(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    )));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                if pm.get(DIRECTIVE).and_then(Value::as_str) == Some("delete") {
                    out.retain(|o| o.get(key) != Some(kv));
                    continue;
                }
                let base = match pos.and_then(|p| out.get(p)) {
                    Some(Value::Object(o)) => o.clone(),
                    _ => Map::new(),
                };
                match merge_map(&base, pm, prop.items())? {
                    Merged::Value(m) => match pos {
                        Some(p) => {
                            if let Some(slot) = out.get_mut(p) {
                                *slot = Value::Object(m);
                            }
                        }
                        None => out.push(Value::Object(m)),
                    },
                    Merged::Delete => out.retain(|o| o.get(key) != Some(kv)),
                }
            }
            (Value::Object(_), None) => out.push(strip(item)?),
            (Value::Array(_), _) => {
                return Err(bad(format!("a list of lists cannot be merged: {item}")))
            }
            // Scalars in a merging list form a set: add what is missing.
            (scalar, _) => {
                if !out.contains(scalar) {
                    out.push(scalar.clone());
                }
            }
        }
    }
    Ok(out)
}

/// Removes directives and null fields from a value that is being added
/// whole, as the merge of it into nothing.
fn strip(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Object(m) => Ok(Value::Object(strip_map(m)?)),
        Value::Array(l) => Ok(Value::Array(strip_list(l)?)),
        other => Ok(other.clone()),
    }
}

fn strip_map(m: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    for (k, v) in m {
        if k.starts_with('$') || v.is_null() {
            continue;
        }
        out.insert(k.clone(), strip(v)?);
    }
    Ok(out)
}

fn strip_list(l: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(l.len());
    for v in l {
        if v.get(DIRECTIVE).is_some() {
            continue;
        }
        out.push(strip(v)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::by_kind;
    use serde_json::json;

    fn smp(kind: (&str, &str), current: Value, patch: Value) -> Value {
        let res = by_kind(kind.0, kind.1).expect("served");
        apply_patch(
            res,
            PatchType::StrategicMerge,
            &current,
            patch.to_string().as_bytes(),
        )
        .expect("patch applies")
    }

    const POD: (&str, &str) = ("v1", "Pod");
    const DEPLOY: (&str, &str) = ("apps/v1", "Deployment");

    #[test]
    fn content_types_name_patch_types() {
        for (ct, pt) in [
            ("application/json-patch+json", Some(PatchType::Json)),
            (
                "application/merge-patch+json; charset=utf-8",
                Some(PatchType::Merge),
            ),
            (
                "application/strategic-merge-patch+json",
                Some(PatchType::StrategicMerge),
            ),
            ("application/apply-patch+yaml", Some(PatchType::Apply)),
            ("application/json", None),
        ] {
            assert_eq!(PatchType::from_content_type(ct), pt, "{ct}");
            if let Some(pt) = pt {
                assert_eq!(PatchType::from_content_type(pt.content_type()), Some(pt));
            }
        }
    }

    #[test]
    fn json_patch_applies_operations_and_reports_failures() {
        let res = by_kind("v1", "ConfigMap").expect("cm");
        let cur = json!({"metadata":{"name":"c"},"data":{"a":"1"}});
        let out = apply_patch(
            res,
            PatchType::Json,
            &cur,
            br#"[{"op":"add","path":"/data/b","value":"2"},{"op":"remove","path":"/data/a"}]"#,
        )
        .expect("applies");
        assert_eq!(out["data"], json!({"b":"2"}));
        let e = apply_patch(
            res,
            PatchType::Json,
            &cur,
            br#"[{"op":"test","path":"/data/a","value":"9"}]"#,
        )
        .expect_err("test fails");
        assert_eq!(e.code, 422);
        let e = apply_patch(res, PatchType::Json, &cur, b"{}").expect_err("not a list");
        assert_eq!(e.code, 400);
        let e = apply_patch(
            res,
            PatchType::Json,
            &cur,
            br#"[{"op":"replace","path":"","value":3}]"#,
        )
        .expect_err("not an object");
        assert_eq!(e.code, 400);
    }

    #[test]
    fn merge_patch_replaces_lists_and_deletes_with_null() {
        let res = by_kind("v1", "Pod").expect("pod");
        let cur = json!({"metadata":{"labels":{"a":"1","b":"2"}},"spec":{"containers":[{"name":"a"},{"name":"b"}]}});
        let out = apply_patch(
            res,
            PatchType::Merge,
            &cur,
            br#"{"metadata":{"labels":{"a":null,"c":"3"}},"spec":{"containers":[{"name":"z"}]}}"#,
        )
        .expect("applies");
        assert_eq!(out["metadata"]["labels"], json!({"b":"2","c":"3"}));
        assert_eq!(out["spec"]["containers"], json!([{"name":"z"}]));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let cur =
            json!({"spec":{"containers":[{"name":"a","image":"x:1"},{"name":"b","image":"y:1"}]}});
        let out = smp(
            POD,
            cur,
            json!({"spec":{"containers":[{"name":"b","image":"y:2"},{"name":"c","image":"z"}]}}),
        );
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name":"a","image":"x:1"},{"name":"b","image":"y:2"},{"name":"c","image":"z"}])
        );
    }

    #[test]
    fn strategic_merge_merges_ports_env_and_mounts_by_their_keys() {
        let cur = json!({"spec":{"containers":[{"name":"a","ports":[{"containerPort":80,"name":"http"}],
            "env":[{"name":"A","value":"1"}],"volumeMounts":[{"name":"v","mountPath":"/v"}]}]}});
        let out = smp(
            POD,
            cur,
            json!({"spec":{"containers":[{"name":"a","ports":[{"containerPort":80,"name":"web"},{"containerPort":443}],
                "env":[{"name":"B","value":"2"}],"volumeMounts":[{"name":"w","mountPath":"/v"}]}]}}),
        );
        let c = &out["spec"]["containers"][0];
        assert_eq!(
            c["ports"],
            json!([{"containerPort":80,"name":"web"},{"containerPort":443}])
        );
        assert_eq!(
            c["env"],
            json!([{"name":"A","value":"1"},{"name":"B","value":"2"}])
        );
        assert_eq!(c["volumeMounts"], json!([{"name":"w","mountPath":"/v"}]));
    }

    #[test]
    fn strategic_merge_replaces_lists_without_a_merge_strategy() {
        let cur = json!({"spec":{"containers":[{"name":"a","args":["1","2"]}],"tolerations":[{"key":"x"}]}});
        let out = smp(
            POD,
            cur,
            json!({"spec":{"containers":[{"name":"a","args":["3"]}],"tolerations":[{"key":"y"}]}}),
        );
        assert_eq!(out["spec"]["containers"][0]["args"], json!(["3"]));
        assert_eq!(out["spec"]["tolerations"], json!([{"key":"y"}]));
    }

    #[test]
    fn strategic_merge_directives_delete_replace_and_null() {
        let cur = json!({"metadata":{"labels":{"a":"1","b":"2"},"finalizers":["x","y"]},
            "spec":{"containers":[{"name":"a","image":"1"},{"name":"b","image":"2"}]}});
        let out = smp(
            POD,
            cur.clone(),
            json!({"metadata":{"labels":{"a":null},"$deleteFromPrimitiveList/finalizers":["x"]},
                   "spec":{"containers":[{"name":"a","$patch":"delete"}]}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"b":"2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["y"]));
        assert_eq!(out["spec"]["containers"], json!([{"name":"b","image":"2"}]));
        let out = smp(
            POD,
            cur.clone(),
            json!({"spec":{"containers":[{"name":"z","image":"9"},{"$patch":"replace"}]}}),
        );
        assert_eq!(out["spec"]["containers"], json!([{"name":"z","image":"9"}]));
        let out = smp(
            POD,
            cur.clone(),
            json!({"metadata":{"labels":{"$patch":"replace","c":"3"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"c":"3"}));
        let out = smp(POD, cur, json!({"metadata":{"finalizers":["y","z"]}}));
        assert_eq!(
            out["metadata"]["finalizers"],
            json!(["x", "y", "z"]),
            "finalizers merge as a set"
        );
    }

    #[test]
    fn strategic_merge_honours_set_element_order() {
        let cur = json!({"spec":{"containers":[{"name":"a"},{"name":"b"},{"name":"c"}]}});
        let out = smp(
            POD,
            cur,
            json!({"spec":{"$setElementOrder/containers":[{"name":"c"},{"name":"a"}],"containers":[{"name":"c","image":"i"}]}}),
        );
        let names: Vec<&str> = out["spec"]["containers"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, vec!["c", "a", "b"]);
    }

    #[test]
    fn strategic_merge_retain_keys_drops_the_old_union_member() {
        let cur = json!({"spec":{"strategy":{"type":"RollingUpdate","rollingUpdate":{"maxSurge":"25%"}}}});
        let out = smp(
            DEPLOY,
            cur,
            json!({"spec":{"strategy":{"$retainKeys":["type"],"type":"Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type":"Recreate"}));
    }

    #[test]
    fn strategic_merge_reaches_pod_templates_inside_deployments() {
        let cur = json!({"spec":{"replicas":1,"template":{"spec":{"containers":[{"name":"a","image":"1"},{"name":"b","image":"2"}]}}}});
        let out = smp(
            DEPLOY,
            cur,
            json!({"spec":{"replicas":3,"template":{"spec":{"containers":[{"name":"a","image":"9"}]}}}}),
        );
        assert_eq!(out["spec"]["replicas"], 3);
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][1]["image"],
            "2"
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["image"],
            "9"
        );
    }

    #[test]
    fn malformed_strategic_patches_are_bad_requests() {
        let res = by_kind("v1", "Pod").expect("pod");
        let cur = json!({"spec":{"containers":[{"name":"a"}]}});
        for body in [
            "[1]",
            "{",
            r#"{"spec":{"containers":[{"image":"x"}]}}"#,
            r#"{"$patch":"explode"}"#,
            r#"{"spec":{"$retainKeys":"x"}}"#,
            r#"{"spec":{"$setElementOrder/containers":3}}"#,
        ] {
            let e =
                apply_patch(res, PatchType::StrategicMerge, &cur, body.as_bytes()).expect_err(body);
            assert_eq!(e.code, 400, "{body}: {}", e.message);
        }
        let e = apply_patch(res, PatchType::Apply, &cur, b"{}").expect_err("apply");
        assert_eq!(e.code, 400);
    }
    /// The body kubectl 1.32 sent (captured against these OpenAPI
    /// documents) when a container was added, one removed, env replaced
    /// and the strategy switched to Recreate.
    #[test]
    fn a_patch_as_kubectl_apply_sends_it_yields_the_new_configuration() {
        let live = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\": \"apps/v1\", \"kind\": \"Deployment\", \"metadata\": {\"name\": \"web\", \"namespace\": \"default\"}, \"spec\": {\"replicas\": 1, \"selector\": {\"matchLabels\": {\"app\": \"web\"}}, \"strategy\": {\"type\": \"RollingUpdate\", \"rollingUpdate\": {\"maxSurge\": \"25%\", \"maxUnavailable\": \"25%\"}}, \"template\": {\"metadata\": {\"labels\": {\"app\": \"web\"}}, \"spec\": {\"containers\": [{\"name\": \"a\", \"image\": \"nginx:1\", \"ports\": [{\"containerPort\": 80}], \"env\": [{\"name\": \"X\", \"value\": \"1\"}]}, {\"name\": \"b\", \"image\": \"busybox\"}]}}}}"}, "resourceVersion": "5"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "a", "image": "nginx:1", "ports": [{"containerPort": 80}], "env": [{"name": "X", "value": "1"}]}, {"name": "b", "image": "busybox"}]}}}});
        let patch = json!({"spec": {"replicas": 3, "strategy": {"$retainKeys": ["type"], "rollingUpdate": null, "type": "Recreate"}, "template": {"spec": {"$setElementOrder/containers": [{"name": "z"}, {"name": "a"}], "containers": [{"image": "redis", "name": "z"}, {"$setElementOrder/env": [{"name": "Y"}], "env": [{"name": "Y", "value": "2"}, {"$patch": "delete", "name": "X"}], "image": "nginx:2", "name": "a"}, {"$patch": "delete", "name": "b"}]}}}});
        let out = smp(DEPLOY, live, patch);
        let spec = &out["spec"];
        assert_eq!(spec["replicas"], 3);
        assert_eq!(spec["strategy"], json!({"type":"Recreate"}));
        assert_eq!(
            spec["template"]["spec"]["containers"],
            json!([{"image":"redis","name":"z"},{"name":"a","image":"nginx:2","ports":[{"containerPort":80}],"env":[{"name":"Y","value":"2"}]}])
        );
    }
}
