//! URL → what is asked: discovery, OpenAPI, health, or a resource path
//! (`/api/v1/namespaces/default/pods/web/status`). Resource paths go to
//! `handlers`, the rest is answered here.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use evoke_types::registry::{self, Resource};
use evoke_types::status::ApiError;
use http::{Method, Request};

use crate::respond::{self, Reply};
use crate::{compat, discovery, handlers, State};

/// A request for a resource, parsed from the URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// Came in through the legacy `/watch/` prefix.
    pub watch_path: bool,
}

/// The query string, percent-decoded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Params(HashMap<String, String>);

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Params {
    pub(crate) fn parse(query: Option<&str>) -> Self {
        let mut m = HashMap::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(percent_decode(k), percent_decode(v));
        }
        Self(m)
    }

    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// `?watch=1`, `?watch=true`: Go's strconv.ParseBool, as kube reads it.
    pub(crate) fn flag(&self, k: &str) -> bool {
        matches!(
            self.get(k),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }

    pub(crate) fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid value for {k}: {v:?}"))),
        }
    }

    pub(crate) fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// A protobuf OpenAPI v2 `Document` with only `swagger: "2.0"` (field 1)
/// and `info` (field 2: title 1, version 2), hand-encoded.
fn empty_v2_protobuf() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        out.push(number << 3 | 2);
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"Kubernetes");
    field(&mut info, 2, b"v1.32.0");
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0");
    field(&mut doc, 2, &info);
    doc
}

fn not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Parses the segments after `/api/v1` or `/apis/<g>/<v>`.
fn parse_target(group: &str, version: &str, segs: &[&str]) -> Result<Target, ApiError> {
    let mut segs = segs;
    let watch_path = segs.first() == Some(&"watch");
    if watch_path {
        segs = &segs[1..];
    }
    let mut namespace = None;
    // `namespaces/<ns>/<plural>…` is a namespaced path, except the
    // namespace's own subresources (`namespaces/<ns>/status`).
    if segs.len() >= 3
        && segs[0] == "namespaces"
        && !(segs.len() == 3 && matches!(segs[2], "status" | "finalize"))
    {
        namespace = Some(segs[1].to_string());
        segs = &segs[2..];
    }
    let (plural, rest) = segs.split_first().ok_or_else(not_found)?;
    if rest.len() > 2 {
        return Err(not_found());
    }
    let res = registry::by_plural(group, version, plural).ok_or_else(not_found)?;
    if namespace.is_some() && !res.namespaced {
        return Err(not_found());
    }
    let name = rest.first().map(|s| s.to_string());
    let sub = rest.get(1).map(|s| s.to_string());
    if res.namespaced && namespace.is_none() && name.is_some() {
        return Err(not_found());
    }
    if let Some(s) = &sub {
        if !res.subresources.contains(&s.as_str()) {
            return Err(not_found());
        }
    }
    if watch_path && sub.is_some() {
        return Err(not_found());
    }
    Ok(Target {
        res,
        namespace,
        name,
        sub,
        watch_path,
    })
}

fn get_only(method: &Method, path: &str) -> Result<(), ApiError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(respond::method_not_allowed(method, path))
    }
}

pub(crate) async fn dispatch(state: Arc<State>, req: Request<Bytes>) -> Reply {
    match route(state, req).await {
        Ok(r) => r,
        Err(e) => respond::error(&e),
    }
}

async fn route(state: Arc<State>, req: Request<Bytes>) -> Result<Reply, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let accept = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["cacerts"] => {
            get_only(&method, &path)?;
            Ok(respond::full(
                200,
                "text/plain; charset=utf-8",
                state.ca_pem.clone(),
            ))
        }
        ["version"] => {
            get_only(&method, &path)?;
            Ok(respond::json(200, &discovery::version()))
        }
        ["healthz" | "livez" | "readyz", ..] => {
            get_only(&method, &path)?;
            Ok(respond::full(200, "text/plain; charset=utf-8", "ok"))
        }
        ["api"] => {
            get_only(&method, &path)?;
            Ok(discovery::api(&accept, &state.server_address))
        }
        ["apis"] => {
            get_only(&method, &path)?;
            Ok(discovery::apis(&accept))
        }
        ["api", "v1"] => {
            get_only(&method, &path)?;
            discovery::resource_list("", "v1")
                .map(|l| respond::json(200, &l))
                .ok_or_else(not_found)
        }
        ["apis", g] => {
            get_only(&method, &path)?;
            discovery::api_group(g)
                .map(|l| respond::json(200, &l))
                .ok_or_else(not_found)
        }
        ["apis", g, v] => {
            get_only(&method, &path)?;
            discovery::resource_list(g, v)
                .map(|l| respond::json(200, &l))
                .ok_or_else(not_found)
        }
        ["openapi", "v2"] => {
            get_only(&method, &path)?;
            // kubectl asks for v2 only in protobuf, and only to validate
            // kinds the v3 documents do not describe (which it then
            // skips), so it gets an empty protobuf document.
            if accept.contains("protobuf") && !accept.contains("json") {
                return Ok(respond::full(200, OPENAPI_V2_PROTOBUF, empty_v2_protobuf()));
            }
            Ok(respond::full(200, "application/json", compat::openapi_v2()))
        }
        ["openapi", "v3"] => {
            get_only(&method, &path)?;
            Ok(respond::full(
                200,
                "application/json",
                compat::openapi_v3_index(),
            ))
        }
        ["openapi", "v3", rest @ ..] => {
            get_only(&method, &path)?;
            compat::openapi_v3(&rest.join("/"))
                .map(|d| respond::full(200, "application/json", d))
                .ok_or_else(not_found)
        }
        ["api", "v1", rest @ ..] => {
            let t = parse_target("", "v1", rest)?;
            handlers::resource(state, t, req).await
        }
        ["apis", g, v, rest @ ..] => {
            let t = parse_target(g, v, rest)?;
            handlers::resource(state, t, req).await
        }
        _ => Err(not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_cluster_and_subresource_paths_parse() {
        let t = parse_target(
            "",
            "v1",
            &["namespaces", "default", "pods", "web", "status"],
        )
        .expect("pod status");
        assert_eq!(
            (
                t.res.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", Some("default"), Some("web"), Some("status"))
        );
        let t =
            parse_target("", "v1", &["namespaces", "kube-system", "status"]).expect("ns status");
        assert_eq!(
            (t.res.plural, t.name.as_deref(), t.sub.as_deref()),
            ("namespaces", Some("kube-system"), Some("status"))
        );
        let t = parse_target("", "v1", &["namespaces", "x"]).expect("ns");
        assert_eq!((t.res.plural, t.name.as_deref()), ("namespaces", Some("x")));
        let t = parse_target("", "v1", &["pods"]).expect("all pods");
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = parse_target("apps", "v1", &["watch", "namespaces", "d", "deployments"])
            .expect("watch");
        assert!(t.watch_path);
    }

    #[test]
    fn unknown_or_malformed_paths_are_not_found() {
        for p in [
            vec!["widgets"],
            vec!["pods", "x"],
            vec!["namespaces", "d", "nodes"],
            vec!["namespaces", "d", "pods", "p", "nope"],
        ] {
            assert_eq!(
                parse_target("", "v1", &p).map(|_| ()).map_err(|e| e.code),
                Err(404),
                "{p:?}"
            );
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let p = Params::parse(Some(
            "labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x=%zz&y=%4",
        ));
        assert_eq!(p.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(p.flag("watch"));
        assert_eq!(p.get("x"), Some("%zz"));
        assert_eq!(p.get("y"), Some("%4"));
    }
}
