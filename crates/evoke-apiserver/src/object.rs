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
/// store's revision is the truth).
pub(crate) fn to_bytes(obj: &Value) -> Vec<u8> {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    serde_json::to_vec(&o).unwrap_or_default()
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
