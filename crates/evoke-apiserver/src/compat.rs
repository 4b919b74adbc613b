//! The seam to `evoke_types` for decoding, defaulting, validation, patch,
//! apply, managedFields, tables and OpenAPI: handlers call one place, and
//! the OpenAPI documents are serialised once here.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use evoke_types::status::ApiError;
use serde_json::Value;

pub(crate) use evoke_types::decode::decode;

pub(crate) use evoke_types::apply::server_side_apply;
pub(crate) use evoke_types::managed_fields::record_update;
pub(crate) use evoke_types::patch::{apply_patch, PatchType};
pub(crate) use evoke_types::table::to_table;
pub(crate) use evoke_types::validate::field_validation;

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

/// A document serialised once: the OpenAPI documents are large and never
/// change while the server runs.
fn cached(cell: &'static OnceLock<Bytes>, make: impl FnOnce() -> Value) -> Bytes {
    cell.get_or_init(|| Bytes::from(serde_json::to_vec(&make()).unwrap_or_default()))
        .clone()
}

pub(crate) fn openapi_v2() -> Bytes {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    cached(&DOC, || evoke_types::openapi::v2().clone())
}

pub(crate) fn openapi_v3_index() -> Bytes {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    cached(&DOC, evoke_types::openapi::v3_index)
}

pub(crate) fn openapi_v3(group_version: &str) -> Option<Bytes> {
    static DOCS: OnceLock<Mutex<HashMap<String, Bytes>>> = OnceLock::new();
    let docs = DOCS.get_or_init(Default::default);
    let mut map = docs.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = map.get(group_version) {
        return Some(b.clone());
    }
    let doc = evoke_types::openapi::v3(group_version)?;
    let bytes = Bytes::from(serde_json::to_vec(doc).unwrap_or_default());
    map.insert(group_version.to_string(), bytes.clone());
    Some(bytes)
}
