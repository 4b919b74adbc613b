//! `Status`: how every API error reaches a Kubernetes client, so kubectl
//! prints the messages people know.

use serde::{Deserialize, Serialize};

/// One field-level reason an object was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// Machine-readable reason, e.g. `FieldValueRequired`.
    pub reason: String,
    pub message: String,
    /// JSON path of the field, e.g. `metadata.name`.
    pub field: String,
}

/// A failed API call, as kube-apiserver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, …
    pub reason: &'static str,
    pub message: String,
    /// Name, group and kind of the object concerned, when there is one.
    pub name: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    pub causes: Vec<Cause>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            name: None,
            group: None,
            kind: None,
            causes: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// `pods "web" not found`.
    pub fn not_found(group_resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{group_resource} \"{name}\" not found"),
        );
        e.name = Some(name.to_string());
        e.kind = Some(group_resource.to_string());
        e
    }

    /// `pods "web" already exists`.
    pub fn already_exists(group_resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{group_resource} \"{name}\" already exists"),
        );
        e.name = Some(name.to_string());
        e.kind = Some(group_resource.to_string());
        e
    }

    /// The message kube-apiserver gives for a stale resourceVersion.
    pub fn conflict(group_resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {group_resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
        e.name = Some(name.to_string());
        e.kind = Some(group_resource.to_string());
        e
    }

    /// 422 with one cause per bad field: `Pod "x" is invalid: spec.containers: Required value`.
    pub fn invalid(kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let detail = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>()
            .join(", ");
        let message = if causes.len() > 1 {
            format!("{kind} \"{name}\" is invalid: [{detail}]")
        } else {
            format!("{kind} \"{name}\" is invalid: {detail}")
        };
        let mut e = Self::new(422, "Invalid", message);
        e.name = Some(name.to_string());
        e.kind = Some(kind.to_string());
        e.causes = causes;
        e
    }

    /// 410 for a watch or list from a compacted revision.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object sent as the response body.
    pub fn to_status(&self) -> serde_json::Value {
        let mut details = serde_json::Map::new();
        if let Some(n) = &self.name {
            details.insert("name".into(), n.clone().into());
        }
        if let Some(g) = &self.group {
            details.insert("group".into(), g.clone().into());
        }
        if let Some(k) = &self.kind {
            details.insert("kind".into(), k.clone().into());
        }
        if !self.causes.is_empty() {
            details.insert(
                "causes".into(),
                serde_json::to_value(&self.causes).unwrap_or_default(),
            );
        }
        let mut s = serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !details.is_empty() {
            s["details"] = details.into();
        }
        s
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {})", self.message, self.code, self.reason)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_status_reads_like_kube_apiserver() {
        let s = ApiError::not_found("pods", "web").to_status();
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["message"], "pods \"web\" not found");
    }

    #[test]
    fn invalid_status_lists_field_causes() {
        let e = ApiError::invalid(
            "Pod",
            "Bad_Name",
            vec![Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain".into(),
                field: "metadata.name".into(),
            }],
        );
        let s = e.to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
    }
}
