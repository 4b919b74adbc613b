//! Validation as kube-apiserver does it: every problem becomes a field
//! cause of one 422 Invalid, worded like Kubernetes so kubectl users
//! recognise it. Type errors (a string where a number belongs) are found by
//! deserializing into the k8s-openapi type and reported as 400.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::registry::Resource;
use crate::status::{ApiError, Cause};

/// Validates `obj`, an object of kind `res`. On update, `old` is the stored
/// object and immutable fields are checked against it.
pub fn validate(res: &Resource, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    typecheck(res, obj, &name)?;
    let mut v = Errs::default();
    let Some(o) = obj.as_object() else {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    };
    if let Some(av) = o.get("apiVersion").and_then(Value::as_str) {
        if av != res.api_version() {
            v.invalid(
                "apiVersion",
                &Value::from(av),
                &format!("must be {}", res.api_version()),
            );
        }
    }
    if let Some(k) = o.get("kind").and_then(Value::as_str) {
        if k != res.kind {
            v.invalid("kind", &Value::from(k), &format!("must be {}", res.kind));
        }
    }
    metadata(res, o.get("metadata"), &mut v);
    match (res.group, res.kind) {
        ("", "Pod") => {
            let spec = o.get("spec");
            match spec {
                Some(s) => pod_spec(s, "spec", &mut v),
                None => v.required("spec", ""),
            }
        }
        ("apps", "Deployment") | ("apps", "ReplicaSet") => workload(res.kind, o, &mut v),
        ("", "Service") => service(o, &mut v),
        ("", "ConfigMap") => data_keys(o, &["data", "binaryData"], &mut v),
        ("", "Endpoints") => endpoints(o, &mut v),
        ("discovery.k8s.io", "EndpointSlice") => endpoint_slice(o, &mut v),
        ("coordination.k8s.io", "Lease") => {
            for key in ["leaseDurationSeconds", "leaseTransitions"] {
                if let Some(n) = o
                    .get("spec")
                    .and_then(|s| s.get(key))
                    .and_then(Value::as_i64)
                {
                    let min = if key == "leaseDurationSeconds" { 1 } else { 0 };
                    if n < min {
                        v.invalid(
                            &format!("spec.{key}"),
                            &Value::from(n),
                            &format!("must be greater than or equal to {min}"),
                        );
                    }
                }
            }
        }
        ("", "Secret") => data_keys(o, &["data", "stringData"], &mut v),
        ("node.k8s.io", "RuntimeClass") => match o.get("handler").and_then(Value::as_str) {
            None | Some("") => v.required("handler", ""),
            Some(h) => {
                if let Some(msg) = dns_label(h) {
                    v.invalid("handler", &Value::from(h), &msg);
                }
            }
        },
        _ => {}
    }
    if let Some(old) = old {
        immutable(res, obj, old, &mut v);
    }
    if v.0.is_empty() {
        Ok(())
    } else {
        let mut e = ApiError::invalid(res.kind, &name, v.0);
        e.group = Some(res.group.to_string());
        Err(e)
    }
}

/// Fields of `obj` its kind's schema does not declare, as kube names them
/// (`spec.containers[0].foo`), in document order.
pub fn unknown_fields(res: &Resource, obj: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_unknown(
        obj,
        crate::schema::Schema::for_resource(res),
        "",
        &mut out,
        0,
    );
    out
}

fn walk_unknown(
    v: &Value,
    schema: crate::schema::Schema,
    path: &str,
    out: &mut Vec<String>,
    depth: usize,
) {
    if depth > 100 || !schema.is_known() {
        return;
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) if schema.has_properties() => {
            for (k, x) in m {
                let child = schema.property(k);
                if child.is_known() {
                    walk_unknown(x, child, &join(k), out, depth + 1);
                } else {
                    out.push(join(k));
                }
            }
        }
        Value::Object(m) if schema.is_map() => {
            for (k, x) in m {
                walk_unknown(x, schema.values(), &join(k), out, depth + 1);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                walk_unknown(x, schema.items(), &format!("{path}[{i}]"), out, depth + 1);
            }
        }
        _ => {}
    }
}

/// Applies a request's `fieldValidation` directive (`Strict`, `Warn` or
/// `Ignore`; kube's default is `Warn`) to the unknown fields of `obj`.
/// Strict refuses them with kube's 400; otherwise the returned strings are
/// the `Warning` headers to send (`unknown field "spec.foo"`).
pub fn field_validation(
    res: &Resource,
    obj: &Value,
    directive: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let directive = directive.unwrap_or("Warn");
    let mode = match directive.to_ascii_lowercase().as_str() {
        "" | "warn" => "Warn",
        "strict" => "Strict",
        "ignore" => "Ignore",
        _ => {
            return Err(ApiError::bad_request(format!(
            "fieldValidation must be one of \"Ignore\", \"Warn\", or \"Strict\", got {directive:?}"
        )))
        }
    };
    if mode == "Ignore" {
        return Ok(Vec::new());
    }
    let unknown: Vec<String> = unknown_fields(res, obj)
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if mode == "Strict" && !unknown.is_empty() {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            unknown.join(", ")
        )));
    }
    Ok(unknown)
}

/// Deserializes into the k8s-openapi type, so wrong field types are caught
/// with serde's message, as kube-apiserver's decoder would.
fn typecheck(res: &Resource, obj: &Value, name: &str) -> Result<(), ApiError> {
    use k8s_openapi::api::{apps, coordination, core, discovery, node};
    fn check<T: serde::de::DeserializeOwned>(obj: &Value) -> Result<(), String> {
        T::deserialize(obj).map(|_| ()).map_err(|e| e.to_string())
    }
    let r = match (res.group, res.kind) {
        ("", "Namespace") => check::<core::v1::Namespace>(obj),
        ("", "Node") => check::<core::v1::Node>(obj),
        ("", "Pod") => check::<core::v1::Pod>(obj),
        ("", "Binding") => check::<core::v1::Binding>(obj),
        ("", "Service") => check::<core::v1::Service>(obj),
        ("", "Endpoints") => check::<core::v1::Endpoints>(obj),
        ("", "ConfigMap") => check::<core::v1::ConfigMap>(obj),
        ("", "Secret") => check::<core::v1::Secret>(obj),
        ("", "Event") => check::<core::v1::Event>(obj),
        ("", "ServiceAccount") => check::<core::v1::ServiceAccount>(obj),
        ("apps", "Deployment") => check::<apps::v1::Deployment>(obj),
        ("apps", "ReplicaSet") => check::<apps::v1::ReplicaSet>(obj),
        ("node.k8s.io", "RuntimeClass") => check::<node::v1::RuntimeClass>(obj),
        ("coordination.k8s.io", "Lease") => check::<coordination::v1::Lease>(obj),
        ("discovery.k8s.io", "EndpointSlice") => check::<discovery::v1::EndpointSlice>(obj),
        _ => Ok(()),
    };
    r.map_err(|e| {
        let mut err = ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            res.kind, res.version, res.kind
        ));
        err.name = Some(name.to_string());
        err.kind = Some(res.kind.to_string());
        err
    })
}

/// Collected field errors.
#[derive(Default)]
struct Errs(Vec<Cause>);

impl Errs {
    fn push(&mut self, reason: &str, field: &str, message: String) {
        self.0.push(Cause {
            reason: reason.to_string(),
            message,
            field: field.to_string(),
        });
    }
    fn required(&mut self, field: &str, detail: &str) {
        let msg = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        self.push("FieldValueRequired", field, msg);
    }
    fn invalid(&mut self, field: &str, value: &Value, detail: &str) {
        self.push(
            "FieldValueInvalid",
            field,
            format!("Invalid value: {}: {detail}", show(value)),
        );
    }
    fn unsupported(&mut self, field: &str, value: &Value, supported: &[&str]) {
        let list = supported
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        self.push(
            "FieldValueNotSupported",
            field,
            format!(
                "Unsupported value: {}: supported values: {list}",
                show(value)
            ),
        );
    }
    fn duplicate(&mut self, field: &str, value: &Value) {
        self.push(
            "FieldValueDuplicate",
            field,
            format!("Duplicate value: {}", show(value)),
        );
    }
    fn forbidden(&mut self, field: &str, detail: &str) {
        self.push("FieldValueForbidden", field, format!("Forbidden: {detail}"));
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn label_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// `None` when `s` is an RFC 1123 label, else the reason.
pub fn dns_label(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    (!label_ok(s)).then(|| DNS1123_LABEL_MSG.to_string())
}

/// `None` when `s` is an RFC 1123 subdomain, else the reason.
pub fn dns_subdomain(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    (!s.split('.').all(label_ok)).then(|| DNS1123_SUBDOMAIN_MSG.to_string())
}

/// `None` when `s` is an RFC 1035 label (service names), else the reason.
pub fn dns1035_label(s: &str) -> Option<String> {
    if s.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let ok = label_ok(s) && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase);
    (!ok).then(|| DNS1035_LABEL_MSG.to_string())
}

/// A label or annotation key: `[prefix/]name`, name up to 63 characters of
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn qualified_name(s: &str) -> Option<String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Some("prefix part must be non-empty".into());
        }
        if let Some(m) = dns_subdomain(p) {
            return Some(format!("prefix part {m}"));
        }
    }
    if name.is_empty() {
        return Some("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Some("name part must be no more than 63 characters".into());
    }
    if !label_value_ok(name) {
        return Some("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into());
    }
    None
}

fn label_value_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn metadata(res: &Resource, meta: Option<&Value>, v: &mut Errs) {
    let Some(meta) = meta.and_then(Value::as_object) else {
        v.required("metadata.name", "name or generateName is required");
        return;
    };
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
    let generate = meta
        .get("generateName")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name.is_empty() {
        if generate.is_empty() {
            v.required("metadata.name", "name or generateName is required");
        }
    } else {
        let problem = match (res.group, res.kind) {
            ("", "Namespace") => dns_label(name),
            ("", "Service") => dns1035_label(name),
            _ => dns_subdomain(name),
        };
        if let Some(msg) = problem {
            v.invalid("metadata.name", &Value::from(name), &msg);
        }
    }
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str) {
        if !res.namespaced && !ns.is_empty() {
            v.forbidden("metadata.namespace", "not allowed on this type");
        } else if !ns.is_empty() {
            if let Some(msg) = dns_label(ns) {
                v.invalid("metadata.namespace", &Value::from(ns), &msg);
            }
        }
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, val) in labels {
            if let Some(msg) = qualified_name(k) {
                v.invalid("metadata.labels", &Value::from(k.as_str()), &msg);
            }
            let s = val.as_str().unwrap_or_default();
            if s.len() > 63 {
                v.invalid("metadata.labels", val, "must be no more than 63 characters");
            } else if !s.is_empty() && !label_value_ok(s) {
                v.invalid("metadata.labels", val, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')");
            }
        }
    }
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0usize;
        for (k, val) in ann {
            if let Some(msg) = qualified_name(&k.to_ascii_lowercase()) {
                v.invalid("metadata.annotations", &Value::from(k.as_str()), &msg);
            }
            total += k.len() + val.as_str().map_or(0, str::len);
        }
        if total > 256 * 1024 {
            v.push(
                "FieldValueTooLong",
                "metadata.annotations",
                "Too long: must have at most 262144 bytes".into(),
            );
        }
    }
}

const RESTART: &[&str] = &["Always", "OnFailure", "Never"];
const DNS_POLICIES: &[&str] = &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const PULL: &[&str] = &["Always", "IfNotPresent", "Never"];

fn pod_spec(spec: &Value, path: &str, v: &mut Errs) {
    let Some(s) = spec.as_object() else {
        v.required(path, "");
        return;
    };
    let mut volumes = HashSet::new();
    if let Some(vols) = s.get("volumes").and_then(Value::as_array) {
        for (i, vol) in vols.iter().enumerate() {
            let f = format!("{path}.volumes[{i}].name");
            match vol.get("name").and_then(Value::as_str) {
                None | Some("") => v.required(&f, ""),
                Some(n) => {
                    if let Some(msg) = dns_label(n) {
                        v.invalid(&f, &Value::from(n), &msg);
                    } else if !volumes.insert(n.to_string()) {
                        v.duplicate(&f, &Value::from(n));
                    }
                }
            }
        }
    }
    let mut names = HashSet::new();
    match s.get("containers").and_then(Value::as_array) {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                container(
                    c,
                    &format!("{path}.containers[{i}]"),
                    &volumes,
                    &mut names,
                    v,
                );
            }
        }
        _ => v.required(&format!("{path}.containers"), ""),
    }
    if let Some(cs) = s.get("initContainers").and_then(Value::as_array) {
        for (i, c) in cs.iter().enumerate() {
            container(
                c,
                &format!("{path}.initContainers[{i}]"),
                &volumes,
                &mut names,
                v,
            );
        }
    }
    enum_field(s, "restartPolicy", path, RESTART, v);
    enum_field(s, "dnsPolicy", path, DNS_POLICIES, v);
    if let Some(rc) = s.get("runtimeClassName").and_then(Value::as_str) {
        if let Some(msg) = dns_subdomain(rc) {
            v.invalid(&format!("{path}.runtimeClassName"), &Value::from(rc), &msg);
        }
    }
    for key in ["terminationGracePeriodSeconds", "activeDeadlineSeconds"] {
        if let Some(n) = s.get(key).and_then(Value::as_i64) {
            let min = if key == "activeDeadlineSeconds" { 1 } else { 0 };
            if n < min {
                v.invalid(
                    &format!("{path}.{key}"),
                    &Value::from(n),
                    &format!("must be greater than or equal to {min}"),
                );
            }
        }
    }
    if let Some(n) = s.get("nodeName").and_then(Value::as_str) {
        if !n.is_empty() {
            if let Some(msg) = dns_subdomain(n) {
                v.invalid(&format!("{path}.nodeName"), &Value::from(n), &msg);
            }
        }
    }
}

fn enum_field(o: &Map<String, Value>, key: &str, path: &str, allowed: &[&str], v: &mut Errs) {
    if let Some(val) = o.get(key).and_then(Value::as_str) {
        if !allowed.contains(&val) {
            v.unsupported(&format!("{path}.{key}"), &Value::from(val), allowed);
        }
    }
}

fn container(
    c: &Value,
    path: &str,
    volumes: &HashSet<String>,
    names: &mut HashSet<String>,
    v: &mut Errs,
) {
    let Some(c) = c.as_object() else {
        v.required(path, "");
        return;
    };
    match c.get("name").and_then(Value::as_str) {
        None | Some("") => v.required(&format!("{path}.name"), ""),
        Some(n) => {
            if let Some(msg) = dns_label(n) {
                v.invalid(&format!("{path}.name"), &Value::from(n), &msg);
            } else if !names.insert(n.to_string()) {
                v.duplicate(&format!("{path}.name"), &Value::from(n));
            }
        }
    }
    match c.get("image").and_then(Value::as_str) {
        None => v.required(&format!("{path}.image"), ""),
        Some(i) if i.trim().is_empty() => v.required(&format!("{path}.image"), ""),
        Some(i) if i.trim() != i => v.invalid(
            &format!("{path}.image"),
            &Value::from(i),
            "must not have leading or trailing whitespace",
        ),
        Some(_) => {}
    }
    enum_field(c, "imagePullPolicy", path, PULL, v);
    if let Some(ports) = c.get("ports").and_then(Value::as_array) {
        let mut port_names = HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            let pp = format!("{path}.ports[{i}]");
            match p.get("containerPort").and_then(Value::as_i64) {
                None => v.required(&format!("{pp}.containerPort"), ""),
                Some(n) if !(1..=65535).contains(&n) => v.invalid(
                    &format!("{pp}.containerPort"),
                    &Value::from(n),
                    "must be between 1 and 65535, inclusive",
                ),
                Some(_) => {}
            }
            if let Some(n) = p.get("hostPort").and_then(Value::as_i64) {
                if n != 0 && !(1..=65535).contains(&n) {
                    v.invalid(
                        &format!("{pp}.hostPort"),
                        &Value::from(n),
                        "must be between 1 and 65535, inclusive",
                    );
                }
            }
            if let Some(obj) = p.as_object() {
                enum_field(obj, "protocol", &pp, PROTOCOLS, v);
            }
            if let Some(n) = p.get("name").and_then(Value::as_str) {
                if !n.is_empty() {
                    if let Some(msg) = port_name(n) {
                        v.invalid(&format!("{pp}.name"), &Value::from(n), &msg);
                    } else if !port_names.insert(n.to_string()) {
                        v.duplicate(&format!("{pp}.name"), &Value::from(n));
                    }
                }
            }
        }
    }
    if let Some(env) = c.get("env").and_then(Value::as_array) {
        for (i, e) in env.iter().enumerate() {
            match e.get("name").and_then(Value::as_str) {
                None | Some("") => v.required(&format!("{path}.env[{i}].name"), ""),
                Some(n) if n.contains('=') || !n.bytes().all(|b| (0x20..0x7f).contains(&b)) => v.invalid(
                    &format!("{path}.env[{i}].name"),
                    &Value::from(n),
                    "a valid environment variable name must consist only of printable ASCII characters other than '='",
                ),
                Some(_) => {}
            }
        }
    }
    resources(c.get("resources"), &format!("{path}.resources"), v);
    if let Some(mounts) = c.get("volumeMounts").and_then(Value::as_array) {
        let mut paths = HashSet::new();
        for (i, m) in mounts.iter().enumerate() {
            let mp = format!("{path}.volumeMounts[{i}]");
            match m.get("name").and_then(Value::as_str) {
                None | Some("") => v.required(&format!("{mp}.name"), ""),
                Some(n) if !volumes.contains(n) => v.push(
                    "FieldValueNotFound",
                    &format!("{mp}.name"),
                    format!("Not found: {n:?}"),
                ),
                Some(_) => {}
            }
            match m.get("mountPath").and_then(Value::as_str) {
                None | Some("") => v.required(&format!("{mp}.mountPath"), ""),
                Some(p) => {
                    if !paths.insert(p.to_string()) {
                        v.invalid(
                            &format!("{mp}.mountPath"),
                            &Value::from(p),
                            "must be unique",
                        );
                    }
                }
            }
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get(probe).and_then(Value::as_object) {
            let handlers = ["exec", "httpGet", "tcpSocket", "grpc"]
                .iter()
                .filter(|h| p.contains_key(**h))
                .count();
            if handlers == 0 {
                v.required(&format!("{path}.{probe}"), "must specify a handler type");
            } else if handlers > 1 {
                v.forbidden(
                    &format!("{path}.{probe}"),
                    "may not specify more than 1 handler type",
                );
            }
        }
    }
}

/// An IANA_SVC_NAME: at most 15 characters, lower-case letters, digits and
/// '-', at least one letter, no leading, trailing or double '-'.
fn port_name(n: &str) -> Option<String> {
    let ok = n.len() <= 15
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && n.bytes().any(|c| c.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--");
    (!ok).then(|| "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), must contain at least one letter (a-z), must not contain consecutive hyphens, must not begin or end with a hyphen, and must be no more than 15 characters".to_string())
}

fn workload(kind: &str, o: &Map<String, Value>, v: &mut Errs) {
    let Some(spec) = o.get("spec").and_then(Value::as_object) else {
        v.required("spec", "");
        return;
    };
    if let Some(n) = spec.get("replicas").and_then(Value::as_i64) {
        if n < 0 {
            v.invalid(
                "spec.replicas",
                &Value::from(n),
                "must be greater than or equal to 0",
            );
        }
    }
    let labels = spec
        .get("template")
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.get("labels"))
        .cloned()
        .unwrap_or(Value::Null);
    match spec.get("selector") {
        None | Some(Value::Null) => v.required("spec.selector", ""),
        Some(sel) => {
            let empty = sel
                .get("matchLabels")
                .and_then(Value::as_object)
                .is_none_or(Map::is_empty)
                && sel
                    .get("matchExpressions")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
            if empty {
                v.invalid(
                    "spec.selector",
                    sel,
                    &format!(
                        "empty selector is invalid for {}",
                        kind.to_ascii_lowercase()
                    ),
                );
            } else {
                selector_syntax(sel, "spec.selector", v);
                if !selector_matches(sel, &labels) {
                    v.invalid(
                        "spec.template.metadata.labels",
                        &labels,
                        "`selector` does not match template `labels`",
                    );
                }
            }
        }
    }
    match spec.get("template") {
        Some(t) => pod_spec(
            t.get("spec").unwrap_or(&Value::Null),
            "spec.template.spec",
            v,
        ),
        None => v.required("spec.template", ""),
    }
    for key in [
        "minReadySeconds",
        "revisionHistoryLimit",
        "progressDeadlineSeconds",
    ] {
        if let Some(n) = spec.get(key).and_then(Value::as_i64) {
            if n < 0 {
                v.invalid(
                    &format!("spec.{key}"),
                    &Value::from(n),
                    "must be greater than or equal to 0",
                );
            }
        }
    }
    if let (Some(p), Some(m)) = (
        spec.get("progressDeadlineSeconds").and_then(Value::as_i64),
        spec.get("minReadySeconds").and_then(Value::as_i64),
    ) {
        if kind == "Deployment" && p <= m {
            v.invalid(
                "spec.progressDeadlineSeconds",
                &Value::from(p),
                "must be greater than minReadySeconds",
            );
        }
    }
    if kind == "Deployment" {
        if let Some(st) = spec.get("strategy").and_then(Value::as_object) {
            enum_field(
                st,
                "type",
                "spec.strategy",
                &["Recreate", "RollingUpdate"],
                v,
            );
            if let Some(ru) = st.get("rollingUpdate") {
                rolling_update(ru, v);
            }
            if st.get("type").and_then(Value::as_str) == Some("Recreate")
                && st.contains_key("rollingUpdate")
            {
                v.forbidden(
                    "spec.strategy.rollingUpdate",
                    "may not be specified when strategy `type` is 'Recreate'",
                );
            }
        }
        if let Some(ps) = spec.get("template").and_then(|t| t.get("spec")) {
            if let Some(r) = ps.get("restartPolicy").and_then(Value::as_str) {
                if r != "Always" {
                    v.unsupported(
                        "spec.template.spec.restartPolicy",
                        &Value::from(r),
                        &["Always"],
                    );
                }
            }
        }
    }
}

/// A Kubernetes quantity (`100m`, `1.5`, `512Mi`, `1e3`, `2G`) as a number.
/// `None` when it is not one.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let base: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => {
            10f64.powi(s.get(1..)?.parse::<i32>().ok()?.clamp(-400, 400))
        }
        _ => return None,
    };
    let v = base * mult;
    v.is_finite().then_some(v)
}

fn resources(r: Option<&Value>, path: &str, v: &mut Errs) {
    let Some(r) = r else {
        return;
    };
    let get = |k: &str| r.get(k).and_then(Value::as_object);
    let (req, lim) = (get("requests"), get("limits"));
    for (field, map) in [("requests", req), ("limits", lim)] {
        for (name, q) in map.into_iter().flatten() {
            let text = match q {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            match parse_quantity(&text) {
                None => v.invalid(
                    &format!("{path}.{field}[{name}]"),
                    q,
                    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                ),
                Some(n) if n < 0.0 => v.invalid(
                    &format!("{path}.{field}[{name}]"),
                    q,
                    "must be greater than or equal to 0",
                ),
                Some(_) => {}
            }
        }
    }
    if let (Some(req), Some(lim)) = (req, lim) {
        for (name, rq) in req {
            let num = |x: &Value| match x {
                Value::String(s) => parse_quantity(s),
                Value::Number(n) => n.as_f64(),
                _ => None,
            };
            if let (Some(a), Some(b)) = (num(rq), lim.get(name).and_then(num)) {
                if a > b {
                    v.invalid(
                        &format!("{path}.requests"),
                        rq,
                        &format!(
                            "must be less than or equal to {name} limit of {}",
                            show(lim.get(name).unwrap_or(&Value::Null)).trim_matches('"')
                        ),
                    );
                }
            }
        }
    }
}

fn rolling_update(ru: &Value, v: &mut Errs) {
    let parse = |k: &str| -> Option<(Value, f64)> {
        let x = ru.get(k)?;
        let n = match x {
            Value::Number(n) => n.as_f64()?,
            // NaN marks a string that is not a percentage.
            Value::String(s) => s
                .strip_suffix('%')
                .and_then(|p| p.parse::<f64>().ok())
                .unwrap_or(f64::NAN),
            _ => return None,
        };
        Some((x.clone(), n))
    };
    let surge = parse("maxSurge");
    let unavail = parse("maxUnavailable");
    for (k, val) in [("maxSurge", &surge), ("maxUnavailable", &unavail)] {
        if let Some((x, n)) = val {
            if n.is_nan() {
                v.invalid(&format!("spec.strategy.rollingUpdate.{k}"), x, "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')");
            } else if *n < 0.0 {
                v.invalid(
                    &format!("spec.strategy.rollingUpdate.{k}"),
                    x,
                    "must be greater than or equal to 0",
                );
            } else if x.is_string() && k == "maxUnavailable" && *n > 100.0 {
                v.invalid(
                    &format!("spec.strategy.rollingUpdate.{k}"),
                    x,
                    "must not be greater than 100%",
                );
            }
        }
    }
    let zero = |o: &Option<(Value, f64)>| o.as_ref().is_some_and(|(_, n)| *n == 0.0);
    if zero(&surge) && zero(&unavail) {
        if let Some((x, _)) = &unavail {
            v.invalid(
                "spec.strategy.rollingUpdate.maxUnavailable",
                x,
                "may not be 0 when `maxSurge` is 0",
            );
        }
    }
}

fn selector_syntax(sel: &Value, path: &str, v: &mut Errs) {
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for (i, e) in exprs.iter().enumerate() {
            let op = e
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let values = e
                .get("values")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let f = format!("{path}.matchExpressions[{i}]");
            match op {
                "In" | "NotIn" if values == 0 => v.required(
                    &format!("{f}.values"),
                    "must be specified when `operator` is 'In' or 'NotIn'",
                ),
                "Exists" | "DoesNotExist" if values > 0 => v.forbidden(
                    &format!("{f}.values"),
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                ),
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => v.invalid(
                    &format!("{f}.operator"),
                    &Value::from(other),
                    "not a valid selector operator",
                ),
            }
        }
    }
}

/// Whether a LabelSelector (`matchLabels` and `matchExpressions`) selects
/// the given labels. A malformed selector selects nothing.
pub fn selector_matches(sel: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, want) in ml {
            if get(k) != want.as_str() {
                return false;
            }
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let have = get(key);
            let ok = match e.get("operator").and_then(Value::as_str) {
                Some("In") => have.is_some_and(|h| values.contains(&h)),
                Some("NotIn") => !have.is_some_and(|h| values.contains(&h)),
                Some("Exists") => have.is_some(),
                Some("DoesNotExist") => have.is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];

fn service(o: &Map<String, Value>, v: &mut Errs) {
    let Some(spec) = o.get("spec").and_then(Value::as_object) else {
        v.required("spec", "");
        return;
    };
    enum_field(spec, "type", "spec", SERVICE_TYPES, v);
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let ports = spec.get("ports").and_then(Value::as_array);
    if ty == "ExternalName" {
        match spec.get("externalName").and_then(Value::as_str) {
            None | Some("") => v.required("spec.externalName", ""),
            Some(_) => {}
        }
    } else if ports.is_none_or(Vec::is_empty) && !headless {
        v.required("spec.ports", "");
    }
    if let Some(ip) = spec.get("clusterIP").and_then(Value::as_str) {
        if !ip.is_empty() && ip != "None" && ip.parse::<std::net::IpAddr>().is_err() {
            v.invalid(
                "spec.clusterIPs[0]",
                &Value::from(ip),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            );
        }
    }
    enum_field(spec, "sessionAffinity", "spec", &["ClientIP", "None"], v);
    if ty == "ExternalName" {
        if let Some(n) = spec
            .get("externalName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            if let Some(msg) = dns_subdomain(n.trim_end_matches('.')) {
                v.invalid("spec.externalName", &Value::from(n), &msg);
            }
        }
    }
    if let Some(sel) = spec.get("selector").and_then(Value::as_object) {
        for (k, val) in sel {
            if let Some(msg) = qualified_name(k) {
                v.invalid("spec.selector", &Value::from(k.as_str()), &msg);
            }
            let s = val.as_str().unwrap_or_default();
            if s.len() > 63 || (!s.is_empty() && !label_value_ok(s)) {
                v.invalid("spec.selector", val, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character");
            }
        }
    }
    let Some(ports) = ports else {
        return;
    };
    let mut names = HashSet::new();
    let mut seen = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            v.required(&format!("{pp}.name"), "");
        } else if !name.is_empty() {
            if let Some(msg) = dns_label(name) {
                v.invalid(&format!("{pp}.name"), &Value::from(name), &msg);
            } else if !names.insert(name.to_string()) {
                v.duplicate(&format!("{pp}.name"), &Value::from(name));
            }
        }
        let port = p.get("port").and_then(Value::as_i64);
        match port {
            None => v.required(&format!("{pp}.port"), ""),
            Some(n) if !(1..=65535).contains(&n) => v.invalid(
                &format!("{pp}.port"),
                &Value::from(n),
                "must be between 1 and 65535, inclusive",
            ),
            Some(_) => {}
        }
        if let Some(obj) = p.as_object() {
            enum_field(obj, "protocol", &pp, PROTOCOLS, v);
        }
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if let Some(n) = port {
            if !seen.insert((n, proto.to_string())) {
                v.duplicate(&pp, &serde_json::json!({"port": n, "protocol": proto}));
            }
        }
        match p.get("targetPort") {
            Some(Value::Number(n)) if !n.as_i64().is_some_and(|n| (1..=65535).contains(&n)) => {
                v.invalid(
                    &format!("{pp}.targetPort"),
                    &Value::Number(n.clone()),
                    "must be between 1 and 65535, inclusive",
                );
            }
            Some(Value::String(s)) => {
                if let Some(msg) = port_name(s) {
                    v.invalid(&format!("{pp}.targetPort"), &Value::from(s.as_str()), &msg);
                }
            }
            _ => {}
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            if np != 0 && ty != "NodePort" && ty != "LoadBalancer" {
                v.forbidden(
                    &format!("{pp}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                );
            }
        }
    }
}

fn data_keys(o: &Map<String, Value>, fields: &[&str], v: &mut Errs) {
    let mut seen = HashSet::new();
    for f in fields {
        if let Some(m) = o.get(*f).and_then(Value::as_object) {
            for k in m.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                    && k != "."
                    && k != ".."
                    && !k.starts_with("..");
                if !ok {
                    v.invalid(
                        &format!("{f}[{k}]"),
                        &Value::from(k.as_str()),
                        "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                    );
                } else if *f != "stringData" && !seen.insert(k.clone()) {
                    v.invalid(
                        &format!("{f}[{k}]"),
                        &Value::from(k.as_str()),
                        "duplicate of key present in binaryData",
                    );
                }
            }
        }
    }
}

fn ip_ok(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
}

fn endpoints(o: &Map<String, Value>, v: &mut Errs) {
    for (i, subset) in o
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for key in ["addresses", "notReadyAddresses"] {
            for (j, a) in subset
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let f = format!("subsets[{i}].{key}[{j}].ip");
                match a.get("ip").and_then(Value::as_str) {
                    None | Some("") => v.required(&f, ""),
                    Some(ip) if !ip_ok(ip) => v.invalid(
                        &f,
                        &Value::from(ip),
                        "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                    ),
                    Some(_) => {}
                }
            }
        }
        for (j, p) in subset
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let f = format!("subsets[{i}].ports[{j}].port");
            match p.get("port").and_then(Value::as_i64) {
                Some(n) if (1..=65535).contains(&n) => {}
                Some(n) => v.invalid(
                    &f,
                    &Value::from(n),
                    "must be between 1 and 65535, inclusive",
                ),
                None => v.required(&f, ""),
            }
        }
    }
}

fn endpoint_slice(o: &Map<String, Value>, v: &mut Errs) {
    let ty = o.get("addressType").and_then(Value::as_str);
    match ty {
        None | Some("") => v.required("addressType", ""),
        Some("IPv4" | "IPv6" | "FQDN") => {}
        Some(other) => v.unsupported(
            "addressType",
            &Value::from(other),
            &["FQDN", "IPv4", "IPv6"],
        ),
    }
    for (i, e) in o
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let addrs = e.get("addresses").and_then(Value::as_array);
        match addrs {
            Some(a) if !a.is_empty() => {
                for (j, addr) in a.iter().enumerate() {
                    let s = addr.as_str().unwrap_or_default();
                    let ok = match ty {
                        Some("IPv4") => s.parse::<std::net::Ipv4Addr>().is_ok(),
                        Some("IPv6") => s.parse::<std::net::Ipv6Addr>().is_ok(),
                        _ => dns_subdomain(s).is_none(),
                    };
                    if !ok {
                        v.invalid(
                            &format!("endpoints[{i}].addresses[{j}]"),
                            addr,
                            "must be a valid address of the slice's addressType",
                        );
                    }
                }
            }
            _ => v.required(
                &format!("endpoints[{i}].addresses"),
                "must contain at least 1 address",
            ),
        }
    }
}

fn immutable(res: &Resource, new: &Value, old: &Value, v: &mut Errs) {
    let meta = |o: &Value, k: &str| -> Value {
        o.get("metadata")
            .and_then(|m| m.get(k))
            .cloned()
            .unwrap_or(Value::Null)
    };
    for key in ["name", "namespace", "uid", "creationTimestamp"] {
        let (n, o) = (meta(new, key), meta(old, key));
        // An update that leaves a system field out keeps the stored value.
        let unset = n.is_null() || n.as_str() == Some("");
        if !unset && !o.is_null() && n != o {
            v.invalid(&format!("metadata.{key}"), &n, "field is immutable");
        }
    }
    let spec = |o: &Value| o.get("spec").cloned().unwrap_or(Value::Null);
    match (res.group, res.kind) {
        ("", "Pod") => pod_update(&spec(new), &spec(old), v),
        ("apps", "Deployment") | ("apps", "ReplicaSet") => {
            let (n, o) = (spec(new), spec(old));
            let sel = |s: &Value| s.get("selector").cloned().unwrap_or(Value::Null);
            if sel(&n) != sel(&o) {
                v.invalid("spec.selector", &sel(&n), "field is immutable");
            }
        }
        ("", "Service") => {
            let (n, o) = (spec(new), spec(old));
            let ip = |s: &Value| {
                s.get("clusterIP")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let (ni, oi) = (ip(&n), ip(&o));
            let ext = n.get("type").and_then(Value::as_str) == Some("ExternalName");
            if !oi.is_empty() && !ni.is_empty() && ni != oi && !ext {
                v.invalid(
                    "spec.clusterIPs[0]",
                    &Value::from(ni),
                    "may not change once set",
                );
            }
        }
        ("", "Secret") if old.get("type") != new.get("type") && new.get("type").is_some() => {
            v.invalid(
                "type",
                new.get("type").unwrap_or(&Value::Null),
                "field is immutable",
            );
        }
        ("", "Node") => {
            let cidr = |o: &Value| {
                o.get("spec")
                    .and_then(|s| s.get("podCIDR"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let (n, o) = (cidr(new), cidr(old));
            if !o.is_empty() && n != o {
                v.forbidden(
                    "spec.podCIDRs",
                    "node updates may not change podCIDR except from \"\" to valid",
                );
            }
        }
        ("", "Secret") | ("", "ConfigMap")
            if old.get("immutable").and_then(Value::as_bool) == Some(true) =>
        {
            for f in ["data", "binaryData", "stringData"] {
                if new.get(f) != old.get(f) && !(f == "stringData" && new.get(f).is_none()) {
                    v.forbidden(f, "field is immutable when `immutable` is set");
                }
            }
            if new.get("immutable").and_then(Value::as_bool) != Some(true) {
                v.forbidden("immutable", "field is immutable when `immutable` is set");
            }
        }
        _ => {}
    }
}

/// Pod specs are immutable except for container images, the active
/// deadline, added tolerations and removed scheduling gates. Setting
/// `nodeName` on an unbound pod is allowed too, since evoke's scheduler may
/// bind by update as well as through the binding subresource.
fn pod_update(new: &Value, old: &Value, v: &mut Errs) {
    let mut n = new.clone();
    let mut o = old.clone();
    for key in ["containers", "initContainers"] {
        let olds = o
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(list) = n.get_mut(key).and_then(Value::as_array_mut) {
            for (i, c) in list.iter_mut().enumerate() {
                if let (Some(c), Some(oc)) = (c.as_object_mut(), olds.get(i)) {
                    if let Some(img) = oc.get("image") {
                        c.insert("image".into(), img.clone());
                    }
                }
            }
        }
    }
    if let (Some(nm), Some(om)) = (n.as_object_mut(), o.as_object_mut()) {
        nm.remove("activeDeadlineSeconds");
        om.remove("activeDeadlineSeconds");
        if om
            .get("nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            om.remove("nodeName");
            nm.remove("nodeName");
        }
        // Tolerations may only be added.
        let otol = om
            .remove("tolerations")
            .and_then(|t| t.as_array().cloned())
            .unwrap_or_default();
        let ntol = nm
            .remove("tolerations")
            .and_then(|t| t.as_array().cloned())
            .unwrap_or_default();
        if !otol.iter().all(|t| ntol.contains(t)) {
            v.forbidden(
                "spec.tolerations",
                "existing toleration can not be modified except its tolerationSeconds",
            );
        }
        let ogates = om
            .remove("schedulingGates")
            .and_then(|t| t.as_array().cloned())
            .unwrap_or_default();
        let ngates = nm
            .remove("schedulingGates")
            .and_then(|t| t.as_array().cloned())
            .unwrap_or_default();
        if !ngates.iter().all(|g| ogates.contains(g)) {
            v.forbidden(
                "spec.schedulingGates",
                "only deletion is allowed, but found new scheduling gate",
            );
        }
    }
    if n != o {
        v.forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::by_kind;
    use serde_json::json;

    fn check(
        api_version: &str,
        kind: &str,
        obj: Value,
        old: Option<Value>,
    ) -> Result<(), ApiError> {
        let res = by_kind(api_version, kind).expect("served");
        validate(res, &obj, old.as_ref())
    }

    fn fields(e: &ApiError) -> Vec<String> {
        e.causes.iter().map(|c| c.field.clone()).collect()
    }

    fn pod(spec: Value) -> Value {
        json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"default"},"spec":spec})
    }

    #[test]
    fn a_valid_pod_passes() {
        check("v1", "Pod", pod(json!({"containers":[{"name":"c","image":"nginx","ports":[{"containerPort":80,"name":"http"}]}]})), None)
            .expect("valid");
    }

    #[test]
    fn invalid_pods_name_every_bad_field_like_kube_apiserver() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (pod(json!({})), "spec.containers", "Required value"),
            (
                pod(json!({"containers":[{"name":"c"}]})),
                "spec.containers[0].image",
                "Required value",
            ),
            (
                pod(json!({"containers":[{"image":"x"}]})),
                "spec.containers[0].name",
                "Required value",
            ),
            (
                pod(json!({"containers":[{"name":"C_1","image":"x"}]})),
                "spec.containers[0].name",
                "RFC 1123 label",
            ),
            (
                pod(json!({"containers":[{"name":"c","image":"x"},{"name":"c","image":"y"}]})),
                "spec.containers[1].name",
                "Duplicate value",
            ),
            (
                pod(json!({"restartPolicy":"Sometimes","containers":[{"name":"c","image":"x"}]})),
                "spec.restartPolicy",
                "Unsupported value: \"Sometimes\"",
            ),
            (
                pod(
                    json!({"containers":[{"name":"c","image":"x","ports":[{"containerPort":70000}]}]}),
                ),
                "spec.containers[0].ports[0].containerPort",
                "between 1 and 65535",
            ),
            (
                pod(
                    json!({"containers":[{"name":"c","image":"x","volumeMounts":[{"name":"v","mountPath":"/v"}]}]}),
                ),
                "spec.containers[0].volumeMounts[0].name",
                "Not found",
            ),
            (
                json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"Bad_Name"},"spec":{"containers":[{"name":"c","image":"x"}]}}),
                "metadata.name",
                "RFC 1123 subdomain",
            ),
            (
                json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","labels":{"bad key":"v"}},"spec":{"containers":[{"name":"c","image":"x"}]}}),
                "metadata.labels",
                "name part",
            ),
            (
                json!({"apiVersion":"v1","kind":"Pod","metadata":{},"spec":{"containers":[{"name":"c","image":"x"}]}}),
                "metadata.name",
                "name or generateName",
            ),
        ];
        for (obj, field, msg) in cases {
            let e = check("v1", "Pod", obj.clone(), None).expect_err(&obj.to_string());
            assert_eq!(e.code, 422);
            let c = e
                .causes
                .iter()
                .find(|c| c.field == field)
                .unwrap_or_else(|| panic!("no cause {field} in {:?}", fields(&e)));
            assert!(c.message.contains(msg), "{:?} lacks {msg:?}", c.message);
            assert!(e.message.starts_with("Pod \""), "{}", e.message);
        }
    }

    #[test]
    fn wrong_field_types_are_bad_requests() {
        let e =
            check("v1", "Pod", pod(json!({"containers":"nope"})), None).expect_err("type error");
        assert_eq!(e.code, 400);
        assert!(
            e.message.contains("cannot be handled as a Pod"),
            "{}",
            e.message
        );
    }

    fn deployment(selector: Value, labels: Value) -> Value {
        json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web"},
               "spec":{"selector":selector,"template":{"metadata":{"labels":labels},
               "spec":{"containers":[{"name":"c","image":"nginx"}]}}}})
    }

    #[test]
    fn a_deployment_selector_must_match_its_template_labels() {
        check(
            "apps/v1",
            "Deployment",
            deployment(
                json!({"matchLabels":{"app":"web"}}),
                json!({"app":"web","x":"y"}),
            ),
            None,
        )
        .expect("matching");
        let e = check(
            "apps/v1",
            "Deployment",
            deployment(json!({"matchLabels":{"app":"web"}}), json!({"app":"db"})),
            None,
        )
        .expect_err("mismatch");
        assert_eq!(fields(&e), vec!["spec.template.metadata.labels"]);
        assert!(e
            .message
            .contains("`selector` does not match template `labels`"));
        let e = check(
            "apps/v1",
            "Deployment",
            deployment(json!({}), json!({"app":"db"})),
            None,
        )
        .expect_err("empty");
        assert_eq!(fields(&e), vec!["spec.selector"]);
        let expr =
            json!({"matchExpressions":[{"key":"app","operator":"In","values":["web","api"]}]});
        check(
            "apps/v1",
            "Deployment",
            deployment(expr, json!({"app":"api"})),
            None,
        )
        .expect("expression match");
    }

    #[test]
    fn a_deployment_selector_is_immutable() {
        let old = deployment(
            json!({"matchLabels":{"app":"web"}}),
            json!({"app":"web","v":"2"}),
        );
        let new = deployment(
            json!({"matchLabels":{"app":"web","v":"2"}}),
            json!({"app":"web","v":"2"}),
        );
        let e = check("apps/v1", "Deployment", new, Some(old)).expect_err("immutable");
        assert!(e
            .causes
            .iter()
            .any(|c| c.field == "spec.selector" && c.message.contains("field is immutable")));
    }

    #[test]
    fn pod_updates_may_change_only_images_deadlines_and_add_tolerations() {
        let old = pod(
            json!({"containers":[{"name":"c","image":"nginx:1"}],"tolerations":[{"key":"a","operator":"Exists"}]}),
        );
        let image = pod(
            json!({"containers":[{"name":"c","image":"nginx:2"}],"activeDeadlineSeconds":5,
                               "tolerations":[{"key":"a","operator":"Exists"},{"key":"b","operator":"Exists"}]}),
        );
        check("v1", "Pod", image, Some(old.clone())).expect("allowed update");
        let bound = pod(
            json!({"containers":[{"name":"c","image":"nginx:1"}],"nodeName":"n1","tolerations":[{"key":"a","operator":"Exists"}]}),
        );
        check("v1", "Pod", bound, Some(old.clone())).expect("binding an unbound pod");
        let env = pod(
            json!({"containers":[{"name":"c","image":"nginx:1","env":[{"name":"A","value":"1"}]}],"tolerations":[{"key":"a","operator":"Exists"}]}),
        );
        let e = check("v1", "Pod", env, Some(old.clone())).expect_err("env change");
        assert!(e.message.contains("pod updates may not change fields"));
        let dropped = pod(json!({"containers":[{"name":"c","image":"nginx:1"}]}));
        let e = check("v1", "Pod", dropped, Some(old)).expect_err("toleration removed");
        assert!(fields(&e).contains(&"spec.tolerations".to_string()));
    }

    #[test]
    fn metadata_uid_and_name_are_immutable() {
        let mut old = pod(json!({"containers":[{"name":"c","image":"x"}]}));
        old["metadata"]["uid"] = json!("u1");
        let mut new = old.clone();
        new["metadata"]["uid"] = json!("u2");
        let e = check("v1", "Pod", new, Some(old.clone())).expect_err("uid");
        assert_eq!(fields(&e), vec!["metadata.uid"]);
        let mut same = old.clone();
        same["metadata"]
            .as_object_mut()
            .expect("meta")
            .remove("uid");
        check("v1", "Pod", same, Some(old)).expect("omitted uid is kept");
    }

    fn service(spec: Value) -> Value {
        json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},"spec":spec})
    }

    #[test]
    fn services_need_ports_and_keep_their_cluster_ip() {
        check(
            "v1",
            "Service",
            service(json!({"ports":[{"port":80}]})),
            None,
        )
        .expect("valid");
        check("v1", "Service", service(json!({"clusterIP":"None"})), None)
            .expect("headless without ports");
        let e = check("v1", "Service", service(json!({})), None).expect_err("no ports");
        assert_eq!(fields(&e), vec!["spec.ports"]);
        let e = check(
            "v1",
            "Service",
            service(json!({"ports":[{"port":80},{"port":81}]})),
            None,
        )
        .expect_err("unnamed");
        assert_eq!(fields(&e), vec!["spec.ports[0].name", "spec.ports[1].name"]);
        let e = check(
            "v1",
            "Service",
            service(json!({"type":"Magic","ports":[{"port":80}]})),
            None,
        )
        .expect_err("type");
        assert_eq!(fields(&e), vec!["spec.type"]);
        let old = service(json!({"clusterIP":"10.43.0.10","ports":[{"port":80}]}));
        let new = service(json!({"clusterIP":"10.43.0.11","ports":[{"port":80}]}));
        let e = check("v1", "Service", new, Some(old)).expect_err("ip change");
        assert_eq!(fields(&e), vec!["spec.clusterIPs[0]"]);
        let bad = json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"1web"},"spec":{"ports":[{"port":80}]}});
        let e = check("v1", "Service", bad, None).expect_err("dns-1035");
        assert!(e.message.contains("DNS-1035"));
    }

    #[test]
    fn config_keys_and_namespace_names_are_checked() {
        let cm = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"ok.key":"1","bad/key":"2"}});
        let e = check("v1", "ConfigMap", cm, None).expect_err("bad key");
        assert_eq!(fields(&e), vec!["data[bad/key]"]);
        let ns = json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a.b"}});
        let e = check("v1", "Namespace", ns, None).expect_err("label");
        assert_eq!(fields(&e), vec!["metadata.name"]);
    }

    #[test]
    fn unknown_fields_are_named_by_path_and_refused_when_strict() {
        let res = by_kind("apps/v1", "Deployment").expect("deploy");
        let d = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w","labels":{"any":"x"},"bogus":1},
            "spec":{"replicas":1,"replica":2,"template":{"spec":{"containers":[{"name":"c","image":"x","imagePullPolicyy":"Always",
            "resources":{"limits":{"cpu":"1"}}}]}},"strategy":{"rollingUpdate":{"maxSurge":1}}}});
        assert_eq!(
            unknown_fields(res, &d),
            vec![
                "metadata.bogus",
                "spec.replica",
                "spec.template.spec.containers[0].imagePullPolicyy"
            ]
        );
        let e = field_validation(res, &d, Some("Strict")).expect_err("strict");
        assert_eq!(e.code, 400);
        assert!(
            e.message
                .starts_with("strict decoding error: unknown field \"metadata.bogus\""),
            "{}",
            e.message
        );
        assert_eq!(field_validation(res, &d, None).expect("warn").len(), 3);
        assert!(field_validation(res, &d, Some("Ignore"))
            .expect("ignore")
            .is_empty());
        assert_eq!(
            field_validation(res, &d, Some("Nope"))
                .expect_err("bad directive")
                .code,
            400
        );
    }

    #[test]
    fn requests_above_limits_and_bad_quantities_are_invalid() {
        let p = pod(
            json!({"containers":[{"name":"c","image":"x","resources":{"requests":{"cpu":"2","memory":"1Gi"},"limits":{"cpu":"1500m","memory":"2Gi"}}}]}),
        );
        let e = check("v1", "Pod", p, None).expect_err("over limit");
        assert_eq!(fields(&e), vec!["spec.containers[0].resources.requests"]);
        assert!(
            e.message
                .contains("must be less than or equal to cpu limit of 1500m"),
            "{}",
            e.message
        );
        let p = pod(
            json!({"containers":[{"name":"c","image":"x","resources":{"limits":{"memory":"lots"}}}]}),
        );
        let e = check("v1", "Pod", p, None).expect_err("bad quantity");
        assert_eq!(
            fields(&e),
            vec!["spec.containers[0].resources.limits[memory]"]
        );
        for (q, want) in [
            ("100m", Some(0.1)),
            ("1Gi", Some(1073741824.0)),
            ("2", Some(2.0)),
            ("1e3", Some(1000.0)),
            ("1.5k", Some(1500.0)),
            ("x", None),
            ("1Q", None),
            ("", None),
        ] {
            assert_eq!(parse_quantity(q), want, "{q}");
        }
    }

    #[test]
    fn rolling_update_parameters_are_checked() {
        let mut d = deployment(json!({"matchLabels":{"app":"web"}}), json!({"app":"web"}));
        d["spec"]["strategy"] =
            json!({"type":"RollingUpdate","rollingUpdate":{"maxSurge":0,"maxUnavailable":"0%"}});
        let e = check("apps/v1", "Deployment", d.clone(), None).expect_err("both zero");
        assert_eq!(
            fields(&e),
            vec!["spec.strategy.rollingUpdate.maxUnavailable"]
        );
        d["spec"]["strategy"] = json!({"type":"RollingUpdate","rollingUpdate":{"maxSurge":"abc","maxUnavailable":"150%"}});
        let e = check("apps/v1", "Deployment", d, None).expect_err("bad values");
        assert_eq!(
            fields(&e),
            vec![
                "spec.strategy.rollingUpdate.maxSurge",
                "spec.strategy.rollingUpdate.maxUnavailable"
            ]
        );
    }

    #[test]
    fn endpoints_slices_and_secrets_are_checked() {
        let ep = json!({"apiVersion":"v1","kind":"Endpoints","metadata":{"name":"e"},"subsets":[{"addresses":[{"ip":"10.0.0.300"}],"ports":[{"port":0}]}]});
        let e = check("v1", "Endpoints", ep, None).expect_err("bad ip and port");
        assert_eq!(
            fields(&e),
            vec!["subsets[0].addresses[0].ip", "subsets[0].ports[0].port"]
        );
        let es = json!({"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"e"},"addressType":"IPv4","endpoints":[{"addresses":["fe80::1"]}]});
        let e =
            check("discovery.k8s.io/v1", "EndpointSlice", es, None).expect_err("v6 in v4 slice");
        assert_eq!(fields(&e), vec!["endpoints[0].addresses[0]"]);
        let old =
            json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"},"type":"Opaque"});
        let new = json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"},"type":"kubernetes.io/tls"});
        let e = check("v1", "Secret", new, Some(old)).expect_err("type change");
        assert_eq!(fields(&e), vec!["type"]);
    }

    #[test]
    fn name_helpers_follow_the_rfcs() {
        assert!(dns_label("a-1").is_none());
        assert!(dns_label("-a").is_some());
        assert!(dns_label(&"a".repeat(64)).is_some());
        assert!(dns_subdomain("a.b-c.d").is_none());
        assert!(dns_subdomain("a..b").is_some());
        assert!(dns1035_label("1a").is_some());
        assert!(qualified_name("example.com/name").is_none());
        assert!(qualified_name("/name").is_some());
        assert!(port_name("http").is_none());
        assert!(port_name("80").is_some());
    }

    #[test]
    fn odd_shapes_are_reported_not_panicked_on() {
        for res in crate::registry::RESOURCES {
            for obj in [
                json!(null),
                json!(1),
                json!({"metadata": 5}),
                json!({"spec": {"containers": [1, null]}}),
            ] {
                let _ = validate(res, &obj, Some(&obj));
            }
        }
    }
}
