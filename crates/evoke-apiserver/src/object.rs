//! Object plumbing shared by the handlers: store keys, metadata access,
//! resourceVersion injection and timestamps.

use evoke_store::KeyValue;
use evoke_types::registry::Resource;
use evoke_types::status::ApiError;
use serde_json::{Map, Value};

/// `core` stands in for the empty core group in keys.
fn group_dir(res: &Resource) -> &str {
    if res.group.is_empty() {
        "core"
    } else {
        res.group
    }
}

/// `/registry/core/pods/default/web` or `/registry/core/nodes/n1`.
pub(crate) fn key(res: &Resource, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if res.namespaced => {
            format!("/registry/{}/{}/{ns}/{name}", group_dir(res), res.plural)
        }
        _ => format!("/registry/{}/{}/{name}", group_dir(res), res.plural),
    }
}

/// The key prefix holding every object of `res` (in `namespace` if given).
pub(crate) fn prefix(res: &Resource, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if res.namespaced => format!("/registry/{}/{}/{ns}/", group_dir(res), res.plural),
        _ => format!("/registry/{}/{}/", group_dir(res), res.plural),
    }
}

/// A stored object as a client sees it: with its resourceVersion.
pub(crate) fn from_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value).map_err(|e| {
        tracing::error!(key = %kv.key, error = %e, "stored object is not json");
        ApiError::new(
            500,
            "InternalError",
            format!("stored object {} is corrupt", kv.key),
        )
    })?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

/// Serialises an object for the store, without its resourceVersion (the
/// store's revision is the truth). apiVersion, kind and metadata come first
/// so that reads can splice the resourceVersion in without parsing (see
/// [`raw_with_rv`]).
pub(crate) fn to_bytes(obj: &Value) -> Vec<u8> {
    let Some(src) = obj.as_object() else {
        return serde_json::to_vec(obj).unwrap_or_default();
    };
    let mut out = Map::new();
    for k in ["apiVersion", "kind", "metadata"] {
        if let Some(v) = src.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    for (k, v) in src {
        if !out.contains_key(k) {
            out.insert(k.clone(), v.clone());
        }
    }
    if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The stored bytes with `metadata.resourceVersion` set to `rev`, spliced
/// in without parsing. Works on what [`to_bytes`] wrote: the first `{`
/// after the opening one must start the top-level metadata (apiVersion and
/// kind are strings, and a `{` inside a string cannot follow `"metadata":`
/// unescaped). Returns None for any other layout.
pub(crate) fn raw_with_rv(value: &[u8], rev: i64) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"metadata\":{";
    if value.first() != Some(&b'{') {
        return None;
    }
    let brace = 1 + value[1..].iter().position(|b| *b == b'{')?;
    let start = brace.checked_sub(KEY.len() - 1)?;
    if &value[start..=brace] != KEY {
        return None;
    }
    let field = format!("\"resourceVersion\":\"{rev}\"");
    let mut out = Vec::with_capacity(value.len() + field.len() + 1);
    out.extend_from_slice(&value[..=brace]);
    out.extend_from_slice(field.as_bytes());
    if value.get(brace + 1) != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(&value[brace + 1..]);
    Some(out)
}

/// A stored object as response bytes with its resourceVersion: spliced
/// when possible, else parsed and re-serialised.
pub(crate) fn kv_bytes(kv: &KeyValue, rev: i64) -> Result<Vec<u8>, ApiError> {
    if let Some(b) = raw_with_rv(&kv.value, rev) {
        return Ok(b);
    }
    let mut v = from_kv(kv)?;
    set_rv(&mut v, rev);
    Ok(serde_json::to_vec(&v).unwrap_or_default())
}

pub(crate) fn set_rv(obj: &mut Value, rev: i64) {
    meta_mut(obj).insert("resourceVersion".into(), rev.to_string().into());
}

/// `metadata` as a mutable map, created if missing or not an object.
pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let o = obj.as_object_mut().expect("made an object above");
    let m = o
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut().expect("made an object above")
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

pub(crate) fn name(obj: &Value) -> Option<&str> {
    meta_str(obj, "name").filter(|s| !s.is_empty())
}

pub(crate) fn finalizers(obj: &Value) -> Vec<String> {
    obj.get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn labels(obj: &Value) -> Map<String, Value> {
    obj.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// An object reduced to its metadata, as `PartialObjectMetadata`.
pub(crate) fn partial(obj: &Value) -> Value {
    serde_json::json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": obj.get("metadata").cloned().unwrap_or_default(),
    })
}

/// RFC 3339 in seconds, as Kubernetes writes timestamps.
pub(crate) fn now() -> String {
    timestamp(chrono::Utc::now())
}

pub(crate) fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A random suffix of 5 characters for generateName, from kube's alphabet
/// (no vowels, so no words).
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use evoke_types::registry::by_plural;

    #[test]
    fn keys_separate_group_resource_namespace_and_name() {
        let pods = by_plural("", "v1", "pods").expect("pods");
        let nodes = by_plural("", "v1", "nodes").expect("nodes");
        let deploy = by_plural("apps", "v1", "deployments").expect("deployments");
        assert_eq!(
            key(pods, Some("default"), "web"),
            "/registry/core/pods/default/web"
        );
        assert_eq!(key(nodes, None, "n1"), "/registry/core/nodes/n1");
        assert_eq!(prefix(deploy, Some("a")), "/registry/apps/deployments/a/");
        assert_eq!(prefix(pods, None), "/registry/core/pods/");
    }

    #[test]
    fn resource_version_is_spliced_into_stored_bytes_as_parsing_would_set_it() {
        for obj in [
            serde_json::json!({"data": {"x": "\"metadata\":{"}, "metadata": {"name": "a", "labels": {"k": "v"}}, "kind": "ConfigMap", "apiVersion": "v1"}),
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {}}),
            serde_json::json!({"metadata": {"name": "b"}, "spec": {"template": {"metadata": {"name": "inner"}}}}),
        ] {
            let bytes = to_bytes(&obj);
            let spliced = raw_with_rv(&bytes, 42).expect("layout written by to_bytes");
            let parsed: Value = serde_json::from_slice(&spliced).expect("still json");
            let mut want = obj.clone();
            set_rv(&mut want, 42);
            assert_eq!(parsed, want);
        }
        assert_eq!(raw_with_rv(br#"{"spec":{},"metadata":{}}"#, 1), None);
        assert_eq!(raw_with_rv(b"[]", 1), None);
    }

    #[test]
    fn stored_bytes_drop_resource_version_and_reads_restore_it() {
        let obj = serde_json::json!({"metadata": {"name": "a", "resourceVersion": "9"}});
        let bytes = to_bytes(&obj);
        let kv = KeyValue {
            key: "k".into(),
            value: bytes,
            create_revision: 3,
            mod_revision: 4,
        };
        let back = from_kv(&kv).expect("json");
        assert_eq!(back["metadata"]["resourceVersion"], "4");
    }
}
