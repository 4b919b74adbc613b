//! Request bodies to JSON values. kubectl sends JSON, or protobuf from its
//! typed commands (see [`crate::protobuf`]); people with curl send YAML.

use serde_json::Value;

use crate::status::ApiError;

/// The body encodings evoke understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Yaml,
    Protobuf,
}

/// Picks the encoding from a `Content-Type` header value. `None` (no header)
/// and `*/*` are read as JSON-or-YAML by [`decode`]. Patch media types are
/// accepted too, since their bodies are JSON (or YAML for apply).
pub fn encoding_of(content_type: &str) -> Result<Encoding, ApiError> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json"
        | "application/json-patch+json"
        | "application/merge-patch+json"
        | "application/strategic-merge-patch+json" => Ok(Encoding::Json),
        "application/yaml"
        | "application/x-yaml"
        | "text/yaml"
        | "application/apply-patch+yaml" => Ok(Encoding::Yaml),
        "application/vnd.kubernetes.protobuf" => Ok(Encoding::Protobuf),
        _ => Err(unsupported(content_type)),
    }
}

fn unsupported(content_type: &str) -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?})"
        ),
    )
}

/// Parses raw bytes as JSON or YAML into a value, without any shape check.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Value, ApiError> {
    let enc = match content_type.map(str::trim) {
        None | Some("") | Some("*/*") => None,
        Some(ct) => Some(encoding_of(ct)?),
    };
    match enc {
        Some(Encoding::Json) => from_json(body),
        Some(Encoding::Yaml) => from_yaml(body),
        Some(Encoding::Protobuf) => crate::protobuf::decode(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding protobuf body: {e}"))),
        // No declared type: JSON is a subset of YAML, but JSON's errors are
        // clearer, so try it first when the body looks like JSON.
        None => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if matches!(first, Some(b'{') | Some(b'[')) {
                from_json(body)
            } else {
                from_yaml(body)
            }
        }
    }
}

fn from_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn from_yaml(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_yaml::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?;
    Ok(v)
}

/// Decodes an object body. It must be a JSON object naming its `apiVersion`
/// and `kind`; anything else is a 400 with kube-apiserver's wording.
/// Unknown media types are 415.
pub fn decode(body: &[u8], content_type: Option<&str>) -> Result<Value, ApiError> {
    let v = parse(body, content_type)?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: expected an object, got {}",
            type_name(&v)
        )));
    };
    for field in ["apiVersion", "kind"] {
        match obj.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::String(_)) | None | Some(Value::Null) => {
                let label = if field == "kind" { "Kind" } else { "Version" };
                return Err(ApiError::bad_request(format!(
                    "Object '{label}' is missing in '{}'",
                    abbreviate(&v)
                )));
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "couldn't get version/kind; json parse error: {field} must be a string, got {}",
                    type_name(other)
                )))
            }
        }
    }
    Ok(v)
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The object as compact JSON, cut short so an error stays readable.
fn abbreviate(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 200 {
        return s;
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_bodies_decode_to_the_same_object() {
        let json = br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"}}"#;
        let yaml = b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n";
        let a = decode(json, Some("application/json")).expect("json");
        let b = decode(yaml, Some("application/yaml")).expect("yaml");
        let c = decode(yaml, None).expect("sniffed yaml");
        let d = decode(json, None).expect("sniffed json");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
    }

    #[test]
    fn content_type_parameters_are_ignored() {
        let json = br#"{"apiVersion":"v1","kind":"Pod"}"#;
        assert!(decode(json, Some("application/json; charset=utf-8")).is_ok());
    }

    #[test]
    fn bad_bodies_are_refused_with_clear_errors() {
        let cases: &[(&[u8], Option<&str>, u16, &str)] = &[
            (b"{", Some("application/json"), 400, "json parse error"),
            (
                b"[1,2]",
                Some("application/json"),
                400,
                "expected an object",
            ),
            (b"a: [", Some("application/yaml"), 400, "YAML"),
            (b"{\"kind\":\"Pod\"}", None, 400, "'Version' is missing"),
            (b"{\"apiVersion\":\"v1\"}", None, 400, "'Kind' is missing"),
            (
                b"{\"apiVersion\":\"v1\",\"kind\":3}",
                None,
                400,
                "kind must be a string",
            ),
            (
                b"\x0a\x02",
                Some("application/vnd.kubernetes.protobuf"),
                400,
                "protobuf",
            ),
            (b"x", Some("text/plain"), 415, "unknown format"),
            (b"a: 1\n---\nb: 2\n", Some("application/yaml"), 400, "YAML"),
        ];
        for (body, ct, code, needle) in cases {
            let e = decode(body, *ct).expect_err("must fail");
            assert_eq!(
                e.code,
                *code,
                "{:?}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
            assert!(
                e.message.contains(needle),
                "{needle:?} not in {:?}",
                e.message
            );
        }
    }

    #[test]
    fn deeply_nested_input_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(decode(deep.as_bytes(), Some("application/json")).is_err());
        assert!(decode(deep.as_bytes(), Some("application/yaml")).is_err());
    }
}
