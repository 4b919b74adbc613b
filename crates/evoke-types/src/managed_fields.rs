//! `metadata.managedFields`: which manager owns which field, in the
//! FieldsV1 format kube-apiserver uses (`{"f:spec":{"f:replicas":{}}}`,
//! `"k:{\"name\":\"web\"}"` for keyed list items, `"v:..."` for set items).
//!
//! A field set is a set of paths; a path is a list of FieldsV1 path
//! elements kept as their string form, which sorts and compares as
//! kube's does. Which paths an object contributes follows
//! structured-merge-diff: scalars, atomic lists, list items, free-form map
//! entries and empty or null values. [`record_update`] keeps owners current
//! for create, update and patch, so [`crate::apply`] can find conflicts.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::registry::Resource;
use crate::schema::{ListKind, Schema};

/// One path element in FieldsV1 string form: `f:name`, `k:{..}`, `v:..`, `i:N`.
pub type Path = Vec<String>;
/// A set of owned paths.
pub type FieldSet = BTreeSet<Path>;

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: FieldSet,
}

impl Entry {
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation));
        m.insert("apiVersion".into(), json!(self.api_version));
        if !self.time.is_empty() {
            m.insert("time".into(), json!(self.time));
        }
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), to_fields_v1(&self.fields));
        if !self.subresource.is_empty() {
            m.insert("subresource".into(), json!(self.subresource));
        }
        Value::Object(m)
    }

    fn from_value(v: &Value) -> Option<Entry> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut fields = FieldSet::new();
        if let Some(f) = v.get("fieldsV1") {
            from_fields_v1(f, &mut Vec::new(), &mut fields, 0);
        }
        Some(Entry {
            manager: s("manager"),
            operation: s("operation"),
            api_version: s("apiVersion"),
            time: s("time"),
            subresource: s("subresource"),
            fields,
        })
        .filter(|e| !e.operation.is_empty())
    }
}

/// The `managedFields` entries of an object (malformed entries skipped).
pub fn entries(obj: &Value) -> Vec<Entry> {
    obj.get("metadata")
        .and_then(|m| m.get("managedFields"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Entry::from_value).collect())
        .unwrap_or_default()
}

/// Writes entries back, dropping those that own nothing.
pub fn set_entries(obj: &mut Value, list: &[Entry]) {
    let vals: Vec<Value> = list
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_value)
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if vals.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(vals));
        }
    } else if let Some(o) = obj.as_object_mut() {
        // Only an object with no metadata at all gets one; metadata of the
        // wrong type is left for validation to report.
        if !vals.is_empty() && !o.contains_key("metadata") {
            o.insert("metadata".into(), json!({"managedFields": vals}));
        }
    }
}

/// The FieldsV1 tree of a set: a member path with children gets a `"."`.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for pe in path {
            let child = node.entry(pe.clone()).or_insert_with(|| json!({}));
            let Some(obj) = child.as_object_mut() else {
                break;
            };
            node = obj;
        }
    }
    // A member that turned out to have children carries ".".
    mark_members(&mut root, set, &mut Vec::new());
    Value::Object(root)
}

fn mark_members(node: &mut Map<String, Value>, set: &FieldSet, prefix: &mut Path) {
    let keys: Vec<String> = node.keys().filter(|k| *k != ".").cloned().collect();
    for k in keys {
        prefix.push(k.clone());
        if let Some(Value::Object(child)) = node.get_mut(&k) {
            if !child.is_empty() && set.contains(prefix) {
                child.insert(".".into(), json!({}));
            }
            mark_members(child, set, prefix);
        }
        prefix.pop();
    }
}

fn from_fields_v1(v: &Value, prefix: &mut Path, out: &mut FieldSet, depth: usize) {
    let Some(m) = v.as_object() else {
        return;
    };
    if depth > 64 {
        return;
    }
    for (k, child) in m {
        if k == "." {
            continue;
        }
        prefix.push(k.clone());
        let empty = child.as_object().is_none_or(Map::is_empty);
        if empty || child.get(".").is_some() {
            out.insert(prefix.clone());
        }
        from_fields_v1(child, prefix, out, depth + 1);
        prefix.pop();
    }
}

/// Fields nobody owns: identity and bookkeeping the server keeps itself.
fn ignored(path: &Path, res: &Resource, ignore_status: bool) -> bool {
    let first = path.first().map(String::as_str);
    match first {
        Some("f:apiVersion") | Some("f:kind") => true,
        Some("f:status") => ignore_status && res.subresources.contains(&"status"),
        Some("f:metadata") => matches!(
            path.get(1).map(String::as_str),
            Some(
                "f:name"
                    | "f:namespace"
                    | "f:uid"
                    | "f:resourceVersion"
                    | "f:generation"
                    | "f:creationTimestamp"
                    | "f:deletionTimestamp"
                    | "f:deletionGracePeriodSeconds"
                    | "f:managedFields"
                    | "f:selfLink"
            )
        ),
        _ => false,
    }
}

/// The paths `obj` sets, following structured-merge-diff's rules. With
/// `ignore_status`, a kind with a status subresource contributes no status
/// paths (as for applies to the main resource).
pub fn field_set(res: &Resource, obj: &Value, ignore_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(m) = obj.as_object() {
        walk_map(m, Schema::for_resource(res), &mut Vec::new(), &mut out, 0);
    }
    out.retain(|p| !ignored(p, res, ignore_status));
    out
}

const MAX_DEPTH: usize = 100;

fn walk_map(
    m: &Map<String, Value>,
    schema: Schema,
    path: &mut Path,
    out: &mut FieldSet,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    for (k, v) in m {
        let declared = schema.property(k);
        let (child, is_declared) = if declared.is_known() {
            (declared, true)
        } else if schema.is_map() {
            (schema.values(), false)
        } else {
            // Outside the known schema every object is treated as a struct.
            (Schema::unknown(), !schema.is_known() || !schema.is_map())
        };
        path.push(format!("f:{k}"));
        walk_value(v, child, path, out, depth + 1);
        let empty = v.is_null() || v.as_object().is_some_and(Map::is_empty);
        if empty || !is_declared {
            out.insert(path.clone());
        }
        path.pop();
    }
}

fn walk_value(v: &Value, schema: Schema, path: &mut Path, out: &mut FieldSet, depth: usize) {
    match v {
        Value::Object(m) => walk_map(m, schema, path, out, depth),
        Value::Array(items) => match schema.list_kind() {
            ListKind::Atomic => {
                out.insert(path.clone());
            }
            ListKind::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListKind::Map(keys) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(item_element(item, keys).unwrap_or_else(|| format!("i:{i}")));
                    walk_value(item, schema.items(), path, out, depth + 1);
                    out.insert(path.clone());
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// Key fields with a schema default: an item that leaves one out is keyed
/// by the default, as structured-merge-diff does, so `{containerPort: 80}`
/// and `{containerPort: 80, protocol: TCP}` are the same port.
const KEY_DEFAULTS: &[(&str, &str)] = &[("protocol", "TCP")];

/// The value of key field `name` of a list item (its default if it has one
/// and the item leaves it out or sets it to null), and whether it was set.
fn key_value(obj: &Map<String, Value>, name: &str) -> Option<(Value, bool)> {
    match obj.get(name).filter(|v| !v.is_null()) {
        Some(v) => Some((v.clone(), true)),
        None => KEY_DEFAULTS
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, d)| (Value::from(*d), false)),
    }
}

/// `k:{"name":"web"}` for an item of a keyed list: its key fields, sorted
/// by name, as compact JSON, defaults filled in. `None` when the item sets
/// none of its key fields (a null key is no key).
pub fn item_element(item: &Value, keys: &[Value]) -> Option<String> {
    let obj = item.as_object()?;
    let mut names: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
    names.sort_unstable();
    let mut key = Map::new();
    let mut explicit = false;
    for n in names {
        if let Some((v, set)) = key_value(obj, n) {
            explicit |= set;
            key.insert(n.to_string(), v);
        }
    }
    if !explicit {
        return None;
    }
    Some(format!("k:{}", Value::Object(key)))
}

/// Whether list item `item` is the one path element `pe` names.
pub fn item_matches(item: &Value, pe: &str, index: usize) -> bool {
    if let Some(k) = pe.strip_prefix("k:") {
        let Ok(Value::Object(key)) = serde_json::from_str::<Value>(k) else {
            return false;
        };
        let Some(obj) = item.as_object() else {
            return false;
        };
        !key.is_empty()
            && key
                .iter()
                .all(|(n, want)| key_value(obj, n).is_some_and(|(v, _)| &v == want))
    } else if let Some(v) = pe.strip_prefix("v:") {
        serde_json::from_str::<Value>(v).is_ok_and(|want| &want == item)
    } else if let Some(i) = pe.strip_prefix("i:") {
        i.parse::<usize>() == Ok(index)
    } else {
        false
    }
}

/// The value at `path` in `obj`, if there is one.
pub fn get<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for pe in path {
        cur = match pe.strip_prefix("f:") {
            Some(f) => cur.get(f)?,
            None => {
                let list = cur.as_array()?;
                list.iter()
                    .enumerate()
                    .find(|(i, item)| item_matches(item, pe, *i))
                    .map(|(_, item)| item)?
            }
        };
    }
    Some(cur)
}

/// Removes the field or list item at `path`; true when something went.
pub fn remove(obj: &mut Value, path: &[String]) -> bool {
    let Some((last, parent_path)) = path.split_last() else {
        return false;
    };
    let mut cur = obj;
    for pe in parent_path {
        let next = match pe.strip_prefix("f:") {
            Some(f) => cur.get_mut(f),
            None => match cur.as_array_mut() {
                Some(list) => list
                    .iter_mut()
                    .enumerate()
                    .find(|(i, item)| item_matches(item, pe, *i))
                    .map(|(_, item)| item),
                None => None,
            },
        };
        let Some(next) = next else {
            return false;
        };
        cur = next;
    }
    match last.strip_prefix("f:") {
        Some(f) => cur.as_object_mut().is_some_and(|m| m.remove(f).is_some()),
        None => match cur.as_array_mut() {
            Some(list) => {
                let before = list.len();
                let mut i = 0;
                list.retain(|item| {
                    let keep = !item_matches(item, last, i);
                    i += 1;
                    keep
                });
                list.len() != before
            }
            None => false,
        },
    }
}

/// A path as kube prints it in conflicts: `.spec.containers[name="web"].image`.
pub fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for pe in path {
        if let Some(f) = pe.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = pe.strip_prefix("k:") {
            let parts = match serde_json::from_str::<Value>(k) {
                Ok(Value::Object(m)) => m
                    .iter()
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                _ => k.to_string(),
            };
            s.push_str(&format!("[{parts}]"));
        } else if let Some(v) = pe.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else if let Some(i) = pe.strip_prefix("i:") {
            s.push_str(&format!("[{i}]"));
        }
    }
    s
}

/// Records an Update (create, update or patch) by `manager` in
/// `new.metadata.managedFields`: the manager takes the fields it added or
/// changed from whoever held them; fields it removed leave every owner.
/// `now` is an RFC 3339 time such as `2024-01-01T00:00:00Z`.
pub fn record_update(
    res: &Resource,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    now: &str,
) {
    let manager = if manager.is_empty() {
        "unknown"
    } else {
        manager
    };
    let empty = json!({});
    let old_obj = old.unwrap_or(&empty);
    let old_set = field_set(res, old_obj, false);
    let new_set = field_set(res, new, false);
    // Added paths, and paths whose value changed. A list item or map entry
    // that holds an object on both sides is the same member: only its own
    // fields count as changed, so an image bump does not take the item.
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| {
            if !old_set.contains(*p) {
                return true;
            }
            match (get(old_obj, p), get(new, p)) {
                (Some(a), Some(b)) if a.is_object() && b.is_object() => false,
                (a, b) => a != b,
            }
        })
        .cloned()
        .collect();
    let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
    // The client may send managedFields (kubectl does not); otherwise the
    // stored ones carry over.
    let mut list = entries(new);
    if list.is_empty()
        && new
            .get("metadata")
            .and_then(|m| m.get("managedFields"))
            .is_none()
    {
        list = entries(old_obj);
    }
    if list.is_empty() && old.is_some() && !old_set.is_empty() {
        list.push(Entry {
            manager: "before-first-apply".into(),
            operation: "Update".into(),
            api_version: res.api_version(),
            time: now.to_string(),
            subresource: String::new(),
            fields: old_set.clone(),
        });
    }
    if changed.is_empty() && removed.is_empty() {
        set_entries(new, &list);
        return;
    }
    for e in &mut list {
        if e.manager == manager && e.operation == "Update" {
            continue;
        }
        e.fields
            .retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    let api_version = new
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| res.api_version());
    match list
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Update")
    {
        Some(e) => {
            e.fields.retain(|p| !removed.contains(p));
            e.fields.extend(changed);
            e.time = now.to_string();
            e.api_version = api_version;
        }
        None => list.push(Entry {
            manager: manager.to_string(),
            operation: "Update".into(),
            api_version,
            time: now.to_string(),
            subresource: String::new(),
            fields: changed,
        }),
    }
    set_entries(new, &list);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::by_kind;

    fn deploy() -> &'static Resource {
        by_kind("apps/v1", "Deployment").expect("deployments")
    }

    fn paths(set: &FieldSet) -> Vec<String> {
        set.iter().map(|p| path_string(p)).collect()
    }

    #[test]
    fn field_sets_follow_structured_merge_diff() {
        let obj = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w","labels":{"app":"w"}},
            "spec":{"replicas":2,"template":{"spec":{"containers":[{"name":"c","image":"x","args":["a"]}]}}}});
        let set = field_set(deploy(), &obj, true);
        assert_eq!(
            paths(&set),
            vec![
                ".metadata.labels.app",
                ".spec.replicas",
                ".spec.template.spec.containers[name=\"c\"]",
                ".spec.template.spec.containers[name=\"c\"].args",
                ".spec.template.spec.containers[name=\"c\"].image",
                ".spec.template.spec.containers[name=\"c\"].name",
            ]
        );
    }

    #[test]
    fn fields_v1_round_trips_with_dot_for_members_that_have_children() {
        let obj = json!({"metadata":{"labels":{"a":"1"}},"spec":{"template":{"spec":{"containers":[{"name":"c","image":"x"}]}}}});
        let set = field_set(deploy(), &obj, true);
        let v1 = to_fields_v1(&set);
        let item = &v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"];
        assert_eq!(item["."], json!({}));
        assert_eq!(item["f:image"], json!({}));
        let mut back = FieldSet::new();
        from_fields_v1(&v1, &mut Vec::new(), &mut back, 0);
        assert_eq!(back, set);
    }

    #[test]
    fn null_keys_do_not_name_list_items() {
        let keys = [json!("name")];
        assert_eq!(
            item_element(&json!({"name": null, "image": "x"}), &keys),
            None
        );
        assert_eq!(
            item_element(&json!({"name": "a"}), &keys),
            Some("k:{\"name\":\"a\"}".into())
        );
    }

    #[test]
    fn a_port_without_protocol_is_keyed_as_tcp() {
        let keys = [json!("containerPort"), json!("protocol")];
        let bare = item_element(&json!({"containerPort": 80}), &keys);
        assert_eq!(
            bare,
            Some("k:{\"containerPort\":80,\"protocol\":\"TCP\"}".into())
        );
        assert_eq!(
            item_element(&json!({"containerPort": 80, "protocol": "TCP"}), &keys),
            bare
        );
        assert!(item_element(&json!({"protocol": "UDP"}), &keys).is_some());
        assert_eq!(item_element(&json!({}), &keys), None);
        let pe = bare.expect("key");
        assert!(item_matches(&json!({"containerPort": 80}), &pe, 0));
        assert!(!item_matches(
            &json!({"containerPort": 80, "protocol": "UDP"}),
            &pe,
            0
        ));
    }

    #[test]
    fn paths_find_and_remove_keyed_items() {
        let mut obj =
            json!({"spec":{"ports":[{"port":80,"protocol":"TCP"},{"port":53,"protocol":"UDP"}]}});
        let path = vec![
            "f:spec".to_string(),
            "f:ports".into(),
            "k:{\"port\":53,\"protocol\":\"UDP\"}".into(),
        ];
        assert_eq!(get(&obj, &path), Some(&json!({"port":53,"protocol":"UDP"})));
        assert!(remove(&mut obj, &path));
        assert_eq!(obj["spec"]["ports"], json!([{"port":80,"protocol":"TCP"}]));
        assert!(!remove(&mut obj, &path));
        assert_eq!(path_string(&path), ".spec.ports[port=53,protocol=\"UDP\"]");
    }

    #[test]
    fn an_update_takes_the_fields_it_changes_from_their_owner() {
        let res = deploy();
        let mut created = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w"},"spec":{"replicas":1,"paused":false}});
        record_update(res, None, &mut created, "creator", "2024-01-01T00:00:00Z");
        let e = entries(&created);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].manager, "creator");
        assert_eq!(e[0].operation, "Update");
        let mut scaled = created.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(
            res,
            Some(&created),
            &mut scaled,
            "scaler",
            "2024-01-01T00:01:00Z",
        );
        let e = entries(&scaled);
        assert_eq!(e.len(), 2);
        assert_eq!(paths(&e[0].fields), vec![".spec.paused"]);
        assert_eq!(e[1].manager, "scaler");
        assert_eq!(paths(&e[1].fields), vec![".spec.replicas"]);
        assert_eq!(
            scaled["metadata"]["managedFields"][1]["fieldsV1"],
            json!({"f:spec":{"f:replicas":{}}})
        );
    }

    #[test]
    fn changing_a_field_of_a_list_item_does_not_take_the_item() {
        let res = deploy();
        let mut created =
            json!({"spec":{"template":{"spec":{"containers":[{"name":"c","image":"x:1"}]}}}});
        record_update(res, None, &mut created, "creator", "t");
        let mut bumped = created.clone();
        bumped["spec"]["template"]["spec"]["containers"][0]["image"] = json!("x:2");
        record_update(res, Some(&created), &mut bumped, "bumper", "t");
        let e = entries(&bumped);
        assert_eq!(
            paths(&e[1].fields),
            vec![".spec.template.spec.containers[name=\"c\"].image"]
        );
        assert!(
            paths(&e[0].fields).contains(&".spec.template.spec.containers[name=\"c\"]".to_string())
        );
    }

    #[test]
    fn objects_created_without_owners_get_a_before_first_apply_owner() {
        let res = deploy();
        let old = json!({"metadata":{"name":"w"},"spec":{"replicas":1}});
        let mut new = json!({"metadata":{"name":"w"},"spec":{"replicas":1,"paused":true}});
        record_update(res, Some(&old), &mut new, "m", "t");
        let e = entries(&new);
        assert_eq!(e[0].manager, "before-first-apply");
        assert_eq!(paths(&e[0].fields), vec![".spec.replicas"]);
        assert_eq!(paths(&e[1].fields), vec![".spec.paused"]);
    }

    #[test]
    fn malformed_managed_fields_are_ignored() {
        let res = deploy();
        let mut v = json!({"metadata":{"managedFields":[1,{"manager":"x"},{"operation":"Update","fieldsV1":"nope"}]}});
        record_update(res, None, &mut v, "", "t");
        assert!(entries(&v).iter().all(|e| !e.operation.is_empty()));
    }
}
