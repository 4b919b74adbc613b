//! Errors of starting the server. Errors of single requests are
//! [`evoke_types::status::ApiError`], which becomes a `Status` body.

use std::path::PathBuf;

use evoke_store::StoreError;
use evoke_types::status::ApiError;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate {what}: {reason}")]
    Certificate { what: &'static str, reason: String },
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("bootstrap object {key}: {source}")]
    Bootstrap { key: String, source: StoreError },
}

/// Maps a store failure on `name` of `group_resource` to what a client sees.
pub(crate) fn store_to_api(e: StoreError, group_resource: &str, name: &str) -> ApiError {
    match e {
        StoreError::AlreadyExists(_) => ApiError::already_exists(group_resource, name),
        StoreError::NotFound(_) => ApiError::not_found(group_resource, name),
        StoreError::Conflict { .. } => ApiError::conflict(group_resource, name),
        StoreError::Compacted {
            requested,
            compacted,
        } => ApiError::gone(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        StoreError::FutureRevision(r) => {
            let mut e = ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {r}, current: older"),
            );
            e.name = Some(name.to_string());
            e
        }
        other => {
            tracing::error!(error = %other, "store failed");
            ApiError::new(
                500,
                "InternalError",
                format!("Internal error occurred: {other}"),
            )
        }
    }
}
