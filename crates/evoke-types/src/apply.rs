//! Server-side apply (`kubectl apply --server-side`, PATCH with
//! `application/apply-patch+yaml`): the applied configuration is merged into
//! the live object, ownership is recorded per manager in managedFields, a
//! manager that would change a field someone else owns gets a 409 listing
//! the conflicts (unless it forces), and fields a manager stops applying are
//! removed when nobody else owns them.

use serde_json::{json, Map, Value};

use crate::managed_fields::{self, Entry, FieldSet, Path};
use crate::registry::Resource;
use crate::schema::{ListKind, Schema};
use crate::status::{ApiError, Cause};

/// Applies `applied` (the decoded apply body) for `manager` over `current`
/// (`None` when the object does not exist yet) and returns the new object
/// with its managedFields. `now` is the RFC 3339 time stamped on the entry.
pub fn server_side_apply(
    res: &Resource,
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApiError> {
    if manager.is_empty() {
        return Err(ApiError::bad_request(
            "PATCH requests of type apply require the fieldManager parameter",
        ));
    }
    let Some(applied_obj) = applied.as_object() else {
        return Err(ApiError::bad_request(format!(
            "an applied configuration must be an object, got {}",
            crate::decode::type_name(applied)
        )));
    };
    for (field, want) in [
        ("apiVersion", res.api_version()),
        ("kind", res.kind.to_string()),
    ] {
        match applied_obj.get(field).and_then(Value::as_str) {
            Some(v) if v == want => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the applied {field} {v:?} does not match the resource ({want})"
                )))
            }
            None => {
                return Err(ApiError::bad_request(format!(
                    "the applied configuration has no {field}; it must be {want:?}"
                )))
            }
        }
    }
    let mf = applied.get("metadata").and_then(|m| m.get("managedFields"));
    if mf.is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::invalid(
            res.kind,
            applied_name(applied),
            vec![Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: \"\": managedFields must be nil".into(),
                field: "metadata.managedFields".into(),
            }],
        ));
    }
    if let Some(msg) = shape_error(applied, Schema::for_resource(res), "", 0) {
        return Err(ApiError::bad_request(format!(
            "the applied {} cannot be merged: {msg}",
            res.kind
        )));
    }
    if let Some((path, key)) = duplicate_key(applied, Schema::for_resource(res), "", 0) {
        return Err(ApiError::invalid(
            res.kind,
            applied_name(applied),
            vec![Cause {
                reason: "FieldValueDuplicate".into(),
                message: format!("Duplicate value: duplicate entries for key {key}"),
                field: path,
            }],
        ));
    }
    let api_version = res.api_version();
    let applied_set = managed_fields::field_set(res, applied, true);
    // An apply to the main resource does not touch status when the kind has
    // a status subresource, as in kube.
    let mut applied = applied.clone();
    if res.subresources.contains(&"status") {
        if let Some(o) = applied.as_object_mut() {
            o.remove("status");
        }
    }
    let applied = &applied;
    let Some(current) = current else {
        let mut obj = applied.clone();
        strip_nulls(&mut obj);
        let entry = apply_entry(manager, &api_version, now, applied_set);
        managed_fields::set_entries(&mut obj, &[entry]);
        return Ok(obj);
    };

    let mut list = managed_fields::entries(current);
    if list.is_empty() {
        let live = managed_fields::field_set(res, current, false);
        if !live.is_empty() {
            list.push(Entry {
                manager: "before-first-apply".into(),
                operation: "Update".into(),
                api_version: api_version.clone(),
                time: now.to_string(),
                subresource: String::new(),
                fields: live,
            });
        }
    }
    let is_mine =
        |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource.is_empty();

    // Conflicts: fields another manager owns whose value this apply changes.
    let mut conflicts: Vec<(String, String, Path)> = Vec::new();
    for e in list.iter().filter(|e| !is_mine(e)) {
        for p in applied_set.intersection(&e.fields) {
            if is_leaf_change(current, applied, p) {
                conflicts.push((e.manager.clone(), e.api_version.clone(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(res, applied_name(applied), &conflicts));
    }
    if force {
        // Forcing takes only the conflicting fields; fields applied with
        // the value another manager set stay shared.
        for e in list.iter_mut().filter(|e| !is_mine(e)) {
            e.fields.retain(|p| {
                !conflicts
                    .iter()
                    .any(|(m, v, c)| *m == e.manager && *v == e.api_version && c == p)
            });
        }
    }

    let mut obj = current.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    // Fields this manager applied before but no longer does, and nobody
    // else owns, are removed. Deepest first, so items go before parents.
    let previous: FieldSet = list
        .iter()
        .filter(|e| is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: FieldSet = list
        .iter()
        .filter(|e| !is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let dropped: Vec<&Path> = previous
        .iter()
        .filter(|p| !applied_set.contains(*p) && !others.contains(*p))
        .filter(|p| !applied_set.iter().any(|a| a.starts_with(p)))
        .filter(|p| !others.iter().any(|o| o.starts_with(p)))
        .collect();
    // Removing a list item or map takes its fields with it, so only the
    // outermost dropped paths are removed (a keyed item must still have
    // its key fields to be found).
    for p in &dropped {
        let nested = dropped
            .iter()
            .any(|q| q.len() < p.len() && p.starts_with(q));
        if !nested {
            managed_fields::remove(&mut obj, p);
        }
    }

    merge(&mut obj, applied, Schema::for_resource(res), 0);

    list.retain(|e| !is_mine(e));
    list.push(apply_entry(manager, &api_version, now, applied_set));
    managed_fields::set_entries(&mut obj, &list);
    Ok(obj)
}

/// The first place where `v` holds an object, a list or a scalar where its
/// schema declares another of the three: such a configuration cannot be
/// merged field by field. (Scalar types are left to validation.)
fn shape_error(v: &Value, schema: Schema, path: &str, depth: usize) -> Option<String> {
    if depth > 100 || v.is_null() {
        return None;
    }
    let shape = |t: &str| match t {
        "object" => "object",
        "array" => "array",
        _ => "scalar",
    };
    let got = match v {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        _ => "scalar",
    };
    if let Some(want) = schema.type_name().map(shape) {
        if want != got {
            let at = if path.is_empty() { "." } else { path };
            return Some(format!(
                "{at} must be {want_a} {want}, not {got_a} {got}",
                want_a = article(want),
                got_a = article(got)
            ));
        }
    }
    match v {
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let child = if schema.property(k).is_known() {
                schema.property(k)
            } else {
                schema.values()
            };
            shape_error(x, child, &format!("{path}.{k}"), depth + 1)
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| shape_error(x, schema.items(), &format!("{path}[{i}]"), depth + 1)),
        _ => None,
    }
}

fn article(shape: &str) -> &'static str {
    if shape == "object" || shape == "array" {
        "an"
    } else {
        "a"
    }
}

/// The first keyed list in `v` with two items of the same key, as the
/// list's path and the key (`[name="web"]`). Apply cannot tell which of
/// them a manager owns, so kube refuses such configurations.
fn duplicate_key(v: &Value, schema: Schema, path: &str, depth: usize) -> Option<(String, String)> {
    if depth > 100 {
        return None;
    }
    match v {
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let child = if schema.property(k).is_known() {
                schema.property(k)
            } else {
                schema.values()
            };
            duplicate_key(x, child, &format!("{path}.{k}"), depth + 1)
        }),
        Value::Array(items) => {
            if let ListKind::Map(keys) = schema.list_kind() {
                let mut seen = std::collections::HashSet::new();
                for item in items {
                    if let Some(k) = managed_fields::item_element(item, keys) {
                        if !seen.insert(k.clone()) {
                            let shown = managed_fields::path_string(&[k]);
                            return Some((path.trim_start_matches('.').to_string(), shown));
                        }
                    }
                }
            }
            items
                .iter()
                .find_map(|x| duplicate_key(x, schema.items(), path, depth + 1))
        }
        _ => None,
    }
}

fn applied_name(v: &Value) -> &str {
    v.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn apply_entry(manager: &str, api_version: &str, now: &str, fields: FieldSet) -> Entry {
    Entry {
        manager: manager.to_string(),
        operation: "Apply".into(),
        api_version: api_version.to_string(),
        time: now.to_string(),
        subresource: String::new(),
        fields,
    }
}

/// True when path `p` names a value (not a list item or map that merely
/// exists in both) that differs between the live and applied objects.
fn is_leaf_change(live: &Value, applied: &Value, p: &Path) -> bool {
    let (a, l) = (
        managed_fields::get(applied, p),
        managed_fields::get(live, p),
    );
    match (a, l) {
        (Some(a), Some(l)) => {
            let item = p.last().is_some_and(|pe| !pe.starts_with("f:"));
            // A keyed item present on both sides is the same item; its
            // fields are compared on their own paths.
            !(item && a.is_object() && l.is_object()) && a != l
        }
        (Some(_), None) => false,
        _ => false,
    }
}

fn conflict_error(res: &Resource, name: &str, conflicts: &[(String, String, Path)]) -> ApiError {
    let n = conflicts.len();
    let plural = if n == 1 { "conflict" } else { "conflicts" };
    let mut managers: Vec<(&str, &str)> = Vec::new();
    for (m, v, _) in conflicts {
        if !managers.contains(&(m.as_str(), v.as_str())) {
            managers.push((m, v));
        }
    }
    let using = |v: &str| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" using {v}")
        }
    };
    let message = if let [(m, v, p)] = conflicts {
        format!(
            "Apply failed with 1 conflict: conflict with \"{m}\"{}: {}",
            using(v),
            managed_fields::path_string(p)
        )
    } else {
        let mut s = format!("Apply failed with {n} {plural}:");
        for (i, (m, v)) in managers.iter().enumerate() {
            let lead = if i == 0 { " " } else { "" };
            s.push_str(&format!("{lead}conflicts with \"{m}\"{}:", using(v)));
            for (cm, cv, p) in conflicts {
                if cm == m && cv == v {
                    s.push_str(&format!("\n- {}", managed_fields::path_string(p)));
                }
            }
            s.push('\n');
        }
        s.trim_end().to_string()
    };
    let mut e = ApiError::new(409, "Conflict", message);
    e.name = Some(name.to_string());
    e.group = Some(res.group.to_string());
    e.kind = Some(res.plural.to_string());
    e.causes = conflicts
        .iter()
        .map(|(m, v, p)| Cause {
            reason: "FieldManagerConflict".into(),
            message: format!("conflict with \"{m}\"{}", using(v)),
            field: managed_fields::path_string(p),
        })
        .collect();
    e
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(l) => l.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Merges the applied configuration into the live object: maps field by
/// field, keyed lists item by item, sets by value, anything else replaced.
fn merge(live: &mut Value, applied: &Value, schema: Schema, depth: usize) {
    if depth > 100 {
        return;
    }
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                if av.is_null() {
                    l.remove(k);
                    continue;
                }
                let child = if schema.property(k).is_known() {
                    schema.property(k)
                } else {
                    schema.values()
                };
                match l.get_mut(k) {
                    Some(lv) => merge(lv, av, child, depth + 1),
                    None => {
                        let mut v = av.clone();
                        strip_nulls(&mut v);
                        l.insert(k.clone(), v);
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => match schema.list_kind() {
            ListKind::Set => {
                for item in a {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            ListKind::Map(keys) => {
                for item in a {
                    // Items are the same when their whole keys (defaults
                    // filled in) are equal.
                    let key = managed_fields::item_element(item, keys);
                    let pos = key.as_ref().and_then(|k| {
                        l.iter()
                            .position(|x| managed_fields::item_element(x, keys).as_ref() == Some(k))
                    });
                    match pos.and_then(|p| l.get_mut(p)) {
                        Some(slot) => merge(slot, item, schema.items(), depth + 1),
                        None => {
                            let mut v = item.clone();
                            strip_nulls(&mut v);
                            l.push(v);
                        }
                    }
                }
            }
            ListKind::Atomic => *l = a.clone(),
        },
        (live, applied) => {
            let mut v = applied.clone();
            strip_nulls(&mut v);
            *live = v;
        }
    }
}

/// An empty object of `res`'s kind, for applies that create.
pub fn empty_object(res: &Resource) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), json!(res.api_version()));
    m.insert("kind".into(), json!(res.kind));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::managed_fields::{entries, record_update};
    use crate::registry::by_kind;

    const T0: &str = "2024-01-01T00:00:00Z";

    fn res() -> &'static Resource {
        by_kind("apps/v1", "Deployment").expect("deployments")
    }

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","labels":{"app":"web"}},
            "spec":{"replicas":replicas,"selector":{"matchLabels":{"app":"web"}},
            "template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"c","image":image}]}}}})
    }

    #[test]
    fn the_first_apply_creates_the_object_owned_by_its_manager() {
        let out = server_side_apply(res(), None, &deploy(2, "nginx"), "kubectl", false, T0)
            .expect("applies");
        assert_eq!(out["spec"]["replicas"], 2);
        let e = entries(&out);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].manager, "kubectl");
        assert_eq!(e[0].operation, "Apply");
        assert_eq!(
            out["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:replicas"],
            json!({})
        );
        assert_eq!(out["metadata"]["managedFields"][0]["time"], T0);
    }

    #[test]
    fn changing_a_field_another_manager_owns_is_a_conflict() {
        let mut live = deploy(1, "nginx");
        record_update(res(), None, &mut live, "kubectl-client-side-apply", T0);
        let e = server_side_apply(
            res(),
            Some(&live),
            &deploy(3, "nginx"),
            "kubectl",
            false,
            T0,
        )
        .expect_err("conflict");
        assert_eq!(e.code, 409);
        assert_eq!(e.reason, "Conflict");
        assert_eq!(
            e.message,
            "Apply failed with 1 conflict: conflict with \"kubectl-client-side-apply\" using apps/v1: .spec.replicas"
        );
        assert_eq!(e.causes[0].reason, "FieldManagerConflict");
        assert_eq!(e.causes[0].field, ".spec.replicas");
        let e = server_side_apply(
            res(),
            Some(&live),
            &deploy(3, "nginx:2"),
            "kubectl",
            false,
            T0,
        )
        .expect_err("two");
        assert!(e.message.starts_with("Apply failed with 2 conflicts: conflicts with \"kubectl-client-side-apply\" using apps/v1:"), "{}", e.message);
        assert!(e.message.contains("\n- .spec.replicas"), "{}", e.message);
    }

    #[test]
    fn conflicts_are_grouped_by_manager() {
        let mut live = deploy(1, "nginx");
        record_update(res(), None, &mut live, "a", T0);
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(2);
        record_update(res(), Some(&live), &mut scaled, "b", T0);
        let e = server_side_apply(
            res(),
            Some(&scaled),
            &deploy(3, "nginx:2"),
            "kubectl",
            false,
            T0,
        )
        .expect_err("conflicts");
        assert_eq!(
            e.message,
            "Apply failed with 2 conflicts: conflicts with \"a\" using apps/v1:\n- .spec.template.spec.containers[name=\"c\"].image\nconflicts with \"b\" using apps/v1:\n- .spec.replicas"
        );
        assert_eq!(e.causes.len(), 2);
    }

    #[test]
    fn applying_the_same_values_as_another_owner_shares_ownership() {
        let mut live = deploy(1, "nginx");
        record_update(res(), None, &mut live, "creator", T0);
        let out = server_side_apply(
            res(),
            Some(&live),
            &deploy(1, "nginx"),
            "kubectl",
            false,
            T0,
        )
        .expect("no conflict");
        let e = entries(&out);
        assert_eq!(e.len(), 2);
        assert!(e[0]
            .fields
            .iter()
            .any(|p| managed_fields::path_string(p) == ".spec.replicas"));
        assert!(e[1]
            .fields
            .iter()
            .any(|p| managed_fields::path_string(p) == ".spec.replicas"));
    }

    #[test]
    fn force_takes_ownership_from_the_other_manager() {
        let mut live = deploy(1, "nginx");
        live["spec"]["paused"] = json!(false);
        record_update(res(), None, &mut live, "other", T0);
        let out = server_side_apply(res(), Some(&live), &deploy(4, "nginx"), "kubectl", true, T0)
            .expect("forced");
        assert_eq!(out["spec"]["replicas"], 4);
        let e = entries(&out);
        let other = e
            .iter()
            .find(|e| e.manager == "other")
            .expect("other keeps the rest");
        assert!(!other
            .fields
            .iter()
            .any(|p| managed_fields::path_string(p) == ".spec.replicas"));
        let mine = e.iter().find(|e| e.manager == "kubectl").expect("mine");
        assert!(mine
            .fields
            .iter()
            .any(|p| managed_fields::path_string(p) == ".spec.replicas"));
    }

    #[test]
    fn fields_dropped_from_the_applied_config_are_removed_when_owned_by_nobody_else() {
        let mut first = deploy(2, "nginx");
        first["metadata"]["labels"]["tier"] = json!("front");
        first["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .expect("list")
            .push(json!({"name":"sidecar","image":"envoy"}));
        let live = server_side_apply(res(), None, &first, "kubectl", false, T0).expect("create");
        let second = deploy(2, "nginx");
        let out =
            server_side_apply(res(), Some(&live), &second, "kubectl", false, T0).expect("reapply");
        assert!(out["metadata"]["labels"].get("tier").is_none());
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn fields_dropped_but_owned_by_another_manager_stay() {
        let live = server_side_apply(res(), None, &deploy(2, "nginx"), "kubectl", false, T0)
            .expect("create");
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(7);
        record_update(res(), Some(&live), &mut scaled, "autoscaler", T0);
        let mut without = deploy(2, "nginx");
        without["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("replicas");
        let out = server_side_apply(res(), Some(&scaled), &without, "kubectl", false, T0)
            .expect("reapply");
        assert_eq!(out["spec"]["replicas"], 7);
    }

    #[test]
    fn apply_merges_keyed_lists_with_other_managers_items() {
        let live = server_side_apply(res(), None, &deploy(1, "nginx"), "a", false, T0).expect("a");
        let mut b = deploy(1, "nginx");
        b["spec"]["template"]["spec"]["containers"] = json!([{"name":"log","image":"fluent"}]);
        b["spec"].as_object_mut().expect("spec").remove("replicas");
        let out = server_side_apply(res(), Some(&live), &b, "b", false, T0).expect("b");
        let names: Vec<&str> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, vec!["c", "log"]);
    }

    #[test]
    fn apply_to_the_main_resource_leaves_status_alone() {
        let mut live = deploy(1, "x");
        live["status"] = json!({"replicas": 1});
        let mut applied = deploy(1, "x");
        applied["status"] = json!({"replicas": 9});
        let out =
            server_side_apply(res(), Some(&live), &applied, "kubectl", false, T0).expect("applies");
        assert_eq!(out["status"]["replicas"], 1);
    }

    #[test]
    fn a_port_applied_without_protocol_is_the_defaulted_tcp_port() {
        let mut live = deploy(1, "x");
        live["spec"]["template"]["spec"]["containers"][0]["ports"] =
            json!([{"containerPort":80,"protocol":"TCP"}]);
        let live = server_side_apply(res(), None, &live, "kubectl", false, T0).expect("create");
        let mut applied = deploy(1, "x");
        applied["spec"]["template"]["spec"]["containers"][0]["ports"] =
            json!([{"containerPort":80,"name":"http"}]);
        let out =
            server_side_apply(res(), Some(&live), &applied, "kubectl", false, T0).expect("reapply");
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["ports"],
            json!([{"containerPort":80,"name":"http"}]),
            "one port, not two; the protocol it stopped applying goes (defaulting puts TCP back)"
        );
    }

    #[test]
    fn duplicate_keys_in_an_applied_list_are_invalid() {
        let mut d = deploy(1, "x");
        d["spec"]["template"]["spec"]["containers"] =
            json!([{"name":"c","image":"a"},{"name":"c","image":"b"}]);
        let e = server_side_apply(res(), None, &d, "kubectl", false, T0).expect_err("duplicates");
        assert_eq!(e.code, 422);
        assert_eq!(e.causes[0].field, "spec.template.spec.containers");
        assert!(
            e.message.contains("duplicate entries for key [name=\"c\"]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn bad_apply_requests_are_refused() {
        let live = deploy(1, "x");
        let cases: Vec<(Value, &str, u16)> = vec![
            (json!([1]), "kubectl", 400),
            (
                json!({"apiVersion":"v1","kind":"Deployment"}),
                "kubectl",
                400,
            ),
            (json!({"kind":"Deployment"}), "kubectl", 400),
            (deploy(1, "x"), "", 400),
            (
                json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":"n"}),
                "kubectl",
                400,
            ),
            (
                json!({"apiVersion":"apps/v1","kind":"Deployment","spec":{"template":{"spec":{"containers":{"name":"c"}}}}}),
                "kubectl",
                400,
            ),
            (
                json!({"apiVersion":"apps/v1","kind":"Deployment","spec":{"replicas":[1]}}),
                "kubectl",
                400,
            ),
            (
                json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"managedFields":[{"manager":"x"}]}}),
                "kubectl",
                422,
            ),
        ];
        for (applied, mgr, code) in cases {
            let e = server_side_apply(res(), Some(&live), &applied, mgr, false, T0)
                .expect_err(&applied.to_string());
            assert_eq!(e.code, code, "{}", e.message);
        }
    }
}
