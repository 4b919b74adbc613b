//! Building responses: JSON bodies, `Status` errors, streamed bodies.

use bytes::Bytes;
use evoke_types::status::ApiError;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// Every response body: whole (JSON) or streamed (watch).
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) type Reply = Response<Body>;

pub(crate) fn full(code: u16, content_type: &str, bytes: impl Into<Bytes>) -> Reply {
    let body = Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

pub(crate) fn json(code: u16, value: &serde_json::Value) -> Reply {
    full(
        code,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

pub(crate) fn error(e: &ApiError) -> Reply {
    json(e.code, &e.to_status())
}

/// A `Status` of success, as binding and eviction return.
pub(crate) fn success_status(code: u16) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code})
}

pub(crate) fn method_not_allowed(method: &http::Method, what: &str) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method} {what}"),
    )
}
