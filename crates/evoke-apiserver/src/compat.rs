//! The seam to `evoke_types` for decoding, defaulting, validation, patch,
//! apply, managedFields, tables and OpenAPI. Until a function lands there,
//! a small local stand-in with the same signature lives here, so handlers
//! call one place and switching over is a one-line change per function.

use evoke_types::status::ApiError;
use serde_json::{json, Value};

pub(crate) use evoke_types::decode::decode;

pub(crate) use evoke_types::apply::server_side_apply;
pub(crate) use evoke_types::managed_fields::record_update;
pub(crate) use evoke_types::patch::{apply_patch, PatchType};
pub(crate) use evoke_types::table::to_table;

/// The patch type a PATCH request's Content-Type names, or 415.
pub(crate) fn patch_type(content_type: Option<&str>) -> Result<PatchType, ApiError> {
    let ct = content_type.unwrap_or_default();
    PatchType::from_content_type(ct).ok_or_else(|| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the server does not support patch content type {ct:?}"),
        )
    })
}

pub(crate) use evoke_types::defaults::default_object;
pub(crate) use evoke_types::validate::validate;

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
