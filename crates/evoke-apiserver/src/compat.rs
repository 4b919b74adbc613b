//! The seam to `evoke_types` for decoding, defaulting, validation, patch,
//! apply, managedFields, tables and OpenAPI. Until a function lands there,
//! a small local stand-in with the same signature lives here, so handlers
//! call one place and switching over is a one-line change per function.

use evoke_types::registry::Resource;
use evoke_types::status::ApiError;
use serde_json::{json, Value};

pub(crate) use evoke_types::decode::decode;

/// The patch flavours a PATCH request's Content-Type selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub(crate) fn from_content_type(ct: Option<&str>) -> Result<Self, ApiError> {
        let media = ct
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim();
        match media {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" => Ok(Self::Apply),
            _ => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the server does not support patch content type {media:?}"),
            )),
        }
    }
}

pub(crate) use evoke_types::defaults::default_object;
pub(crate) use evoke_types::validate::validate;

/// Drops strategic-merge directives so the rest can merge as JSON.
fn strip_directives(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !k.starts_with('$'));
        for x in o.values_mut() {
            strip_directives(x);
        }
    }
}

pub(crate) fn apply_patch(
    _res: &Resource,
    ty: PatchType,
    current: &Value,
    patch: &[u8],
) -> Result<Value, ApiError> {
    let bad = |e: String| ApiError::bad_request(format!("the patch could not be decoded: {e}"));
    let mut out = current.clone();
    match ty {
        PatchType::Json => {
            let p: json_patch::Patch =
                serde_json::from_slice(patch).map_err(|e| bad(e.to_string()))?;
            json_patch::patch(&mut out, &p).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the json patch could not be applied: {e}"),
                )
            })?;
        }
        PatchType::Merge | PatchType::Strategic => {
            let mut p: Value = serde_json::from_slice(patch).map_err(|e| bad(e.to_string()))?;
            if ty == PatchType::Strategic {
                strip_directives(&mut p);
            }
            json_patch::merge(&mut out, &p);
        }
        PatchType::Apply => {
            return Err(ApiError::bad_request(
                "apply patches go through server-side apply",
            ));
        }
    }
    Ok(out)
}

pub(crate) fn server_side_apply(
    _res: &Resource,
    current: Option<&Value>,
    applied: &Value,
    _manager: &str,
    _force: bool,
    _now: &str,
) -> Result<Value, ApiError> {
    let mut out = current.cloned().unwrap_or_else(|| json!({}));
    json_patch::merge(&mut out, applied);
    Ok(out)
}

pub(crate) fn record_update(
    _res: &Resource,
    _old: Option<&Value>,
    _new: &mut Value,
    _manager: &str,
    _now: &str,
) {
}

/// Stand-in table: name and age.
pub(crate) fn to_table(_res: &Resource, objects: &[Value], list_meta: Value) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let age = o["metadata"]["creationTimestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| {
                    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds();
                    format!("{}s", secs.max(0))
                })
                .unwrap_or_else(|| "<unknown>".into());
            json!({
                "cells": [o["metadata"]["name"].clone(), age],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"].clone()},
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0},
            {"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0},
        ],
        "rows": rows,
    })
}

pub(crate) fn openapi_v2() -> Value {
    json!({"swagger": "2.0", "info": {"title": "evoke", "version": "v1.32.0"}, "paths": {}, "definitions": {}})
}

/// Group versions as OpenAPI v3 names them: `api/v1`, `apis/apps/v1`.
fn v3_group_versions() -> Vec<(String, &'static str, &'static str)> {
    let mut out: Vec<(String, &'static str, &'static str)> = Vec::new();
    for r in evoke_types::registry::RESOURCES {
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

pub(crate) fn openapi_v3_index(base: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for (name, _, _) in v3_group_versions() {
        paths.insert(
            name.clone(),
            json!({"serverRelativeURL": format!("{base}/{name}?hash=evoke-{}", env!("CARGO_PKG_VERSION"))}),
        );
    }
    json!({"paths": paths})
}

/// Stand-in v3 document: paths whose write operations declare the query
/// parameters kubectl probes for (fieldValidation, fieldManager, dryRun),
/// so kubectl validates on the server instead of downloading v2.
pub(crate) fn openapi_v3(group_version: &str) -> Option<Value> {
    let (name, group, version) = v3_group_versions()
        .into_iter()
        .find(|(n, _, _)| n == group_version)?;
    let query = |n: &str| json!({"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": true});
    let params = json!([
        query("dryRun"),
        query("fieldManager"),
        query("fieldValidation")
    ]);
    let mut paths = serde_json::Map::new();
    for r in evoke_types::registry::RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let op = |action: &str| json!({"x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}});
        let base = if r.namespaced {
            format!("/{name}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("/{name}/{}", r.plural)
        };
        paths.insert(base.clone(), json!({"post": op("post")}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"put": op("put"), "patch": op("patch")}),
        );
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}
