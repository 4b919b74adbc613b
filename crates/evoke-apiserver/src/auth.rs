//! Authentication: a client certificate that our CA signed (rustls has
//! verified it during the handshake), the admin bearer token, or the node
//! token that joined agents hold. Nothing else gets in. Tokens are compared
//! in constant time and never logged.
//!
//! Authorization is for nodes only (admins may do anything): a node reads
//! what it likes, as a kubelet does, but writes only what a node agent
//! writes (Nodes and their status, Leases, pod status, pod deletion after
//! termination, Events, the kube-node-lease namespace), and it may not use
//! the pod subresources that reach into workloads (exec, attach, logs,
//! port-forward, proxy). So the join token in an agent's hands cannot
//! create workloads, read logs or exec into pods.

use http::HeaderMap;

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// A client certificate signed by the cluster CA.
    Certificate,
    /// The admin bearer token.
    Token,
    /// The node token: a joined node agent.
    Node,
}

/// Decides who is calling, or None for 401.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    verified_cert: bool,
    token: &str,
    node_token: &str,
) -> Option<Identity> {
    if verified_cert {
        return Some(Identity::Certificate);
    }
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, given) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let given = given.trim().as_bytes();
    // Both comparisons always run, so timing tells nothing either.
    let admin = !token.is_empty() && constant_time_eq(given, token.as_bytes());
    let node = !node_token.is_empty() && constant_time_eq(given, node_token.as_bytes());
    match (admin, node) {
        (true, _) => Some(Identity::Token),
        (false, true) => Some(Identity::Node),
        (false, false) => None,
    }
}

/// What a request touches, from its path.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    /// "" for the core group.
    group: &'a str,
    resource: &'a str,
    subresource: Option<&'a str>,
}

/// Parses `/api/v1/...` and `/apis/GROUP/VERSION/...` exactly as the
/// router does (`route.rs`: empty segments dropped, the legacy `watch/`
/// prefix, a namespace's own `status`/`finalize`), so no spelling of a path
/// reaches a resource other than the one judged here. None for paths
/// outside the resource tree (discovery, /version, /openapi...).
fn target(path: &str) -> Option<Target<'_>> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, mut rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    if rest.first() == Some(&"watch") {
        rest = &rest[1..];
    }
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
    {
        rest = &rest[2..];
    }
    match rest {
        [] => None,
        [resource] | [resource, _] => Some(Target {
            group,
            resource,
            subresource: None,
        }),
        [resource, _, sub, ..] => Some(Target {
            group,
            resource,
            subresource: Some(sub),
        }),
    }
}

/// Whether `who` may make this request; Err is the reason for a 403.
pub(crate) fn authorize(who: &Identity, method: &http::Method, path: &str) -> Result<(), String> {
    if *who != Identity::Node {
        return Ok(());
    }
    use http::Method;
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let Some(t) = target(path) else {
        // Discovery, /version, /openapi: all read-only.
        return if read {
            Ok(())
        } else {
            Err(format!(
                "a node may not {} {path}",
                method.as_str().to_ascii_lowercase()
            ))
        };
    };
    let denied = || {
        let what = match t.subresource {
            Some(sub) => format!("{}/{sub}", t.resource),
            None => t.resource.to_string(),
        };
        format!(
            "a node may not {} resource \"{what}\" in API group \"{}\"",
            method.as_str().to_ascii_lowercase(),
            t.group
        )
    };
    // Subresources that reach into a workload are for users, not nodes.
    if t.resource == "pods"
        && matches!(
            t.subresource,
            Some("exec" | "attach" | "log" | "portforward" | "proxy")
        )
    {
        return Err(denied());
    }
    if read {
        return Ok(());
    }
    let write = matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let allowed = write
        && match (t.group, t.resource, t.subresource) {
            // Its Node object and status (registration, heartbeats).
            ("", "nodes", None | Some("status")) => *method != Method::DELETE,
            // Its Lease, in kube-node-lease.
            ("coordination.k8s.io", "leases", None) => true,
            // Pod status, and the final delete once a pod has stopped.
            ("", "pods", Some("status")) => *method != Method::DELETE,
            ("", "pods", None) => *method == Method::DELETE,
            // Events about what it did.
            ("", "events", None) | ("events.k8s.io", "events", None) => true,
            // The kube-node-lease namespace, if it is missing.
            ("", "namespaces", None) => *method == Method::POST,
            _ => false,
        };
    if allowed {
        Ok(())
    } else {
        Err(denied())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().expect("header"));
        h
    }

    #[test]
    fn right_token_or_verified_certificate_authenticates() {
        assert_eq!(
            authenticate(&bearer("Bearer abc"), false, "abc", "nod"),
            Some(Identity::Token)
        );
        assert_eq!(
            authenticate(&bearer("Bearer nod"), false, "abc", "nod"),
            Some(Identity::Node)
        );
        assert_eq!(
            authenticate(&HeaderMap::new(), true, "abc", "nod"),
            Some(Identity::Certificate)
        );
    }

    #[test]
    fn wrong_missing_or_non_bearer_credentials_are_refused() {
        assert_eq!(
            authenticate(&bearer("Bearer abd"), false, "abc", "nod"),
            None
        );
        assert_eq!(
            authenticate(&bearer("Basic abc"), false, "abc", "nod"),
            None
        );
        assert_eq!(authenticate(&HeaderMap::new(), false, "abc", "nod"), None);
        assert_eq!(authenticate(&bearer("Bearer "), false, "", ""), None);
    }

    #[test]
    fn paths_name_their_group_resource_and_subresource() {
        let t = |group, resource, subresource| {
            Some(Target {
                group,
                resource,
                subresource,
            })
        };
        assert_eq!(target("/api/v1/nodes"), t("", "nodes", None));
        assert_eq!(
            target("/api/v1/nodes/n2/status"),
            t("", "nodes", Some("status"))
        );
        assert_eq!(
            target("/api/v1/namespaces/default/pods/p/exec"),
            t("", "pods", Some("exec"))
        );
        assert_eq!(
            target("/api/v1/namespaces/default"),
            t("", "namespaces", None)
        );
        assert_eq!(
            target("/api/v1/namespaces/x/finalize"),
            t("", "namespaces", Some("finalize"))
        );
        assert_eq!(
            target("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2"),
            t("coordination.k8s.io", "leases", None)
        );
        // Spellings the router accepts name the same target.
        assert_eq!(
            target("//api//v1/namespaces//default/pods/"),
            t("", "pods", None)
        );
        assert_eq!(
            target("/api/v1/watch/namespaces/default/pods"),
            t("", "pods", None)
        );
        assert_eq!(target("/apis/apps/v1"), None);
        assert_eq!(target("/version"), None);
    }

    #[test]
    fn a_node_reads_anything_but_writes_only_what_a_node_agent_writes() {
        use http::Method;
        let node = Identity::Node;
        let ok = |m: Method, p: &str| authorize(&node, &m, p).is_ok();
        // What the agent does.
        assert!(ok(Method::GET, "/api/v1/pods"));
        assert!(ok(Method::GET, "/api/v1/namespaces/ns/secrets/s"));
        assert!(ok(Method::POST, "/api/v1/nodes"));
        assert!(ok(Method::PATCH, "/api/v1/nodes/n2/status"));
        assert!(ok(
            Method::PUT,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2"
        ));
        assert!(ok(Method::PATCH, "/api/v1/namespaces/ns/pods/p/status"));
        assert!(ok(Method::DELETE, "/api/v1/namespaces/ns/pods/p"));
        assert!(ok(Method::POST, "/api/v1/namespaces/ns/events"));
        assert!(ok(Method::POST, "/api/v1/namespaces"));
        assert!(ok(Method::GET, "/version"));
        // What it may not.
        assert!(!ok(Method::POST, "/api/v1/namespaces/ns/pods"));
        assert!(!ok(Method::POST, "/api//v1/namespaces/ns//pods"));
        assert!(!ok(Method::POST, "/api/v1/watch/namespaces/ns/pods"));
        assert!(!ok(Method::POST, "/apis/apps/v1"));
        assert!(!ok(Method::PATCH, "/api/v1/namespaces/ns/pods/p"));
        assert!(!ok(Method::POST, "/apis/apps/v1/namespaces/ns/deployments"));
        assert!(!ok(Method::PUT, "/api/v1/namespaces/ns/secrets/s"));
        assert!(!ok(Method::DELETE, "/api/v1/nodes/other"));
        assert!(!ok(Method::DELETE, "/api/v1/namespaces/ns"));
        assert!(!ok(Method::GET, "/api/v1/namespaces/ns/pods/p/exec"));
        assert!(!ok(Method::GET, "/api/v1/namespaces/ns/pods/p/log"));
        let e = authorize(&node, &Method::POST, "/api/v1/namespaces/ns/pods").unwrap_err();
        assert_eq!(e, "a node may not post resource \"pods\" in API group \"\"");
        // Admins may do anything.
        assert!(authorize(
            &Identity::Token,
            &Method::POST,
            "/api/v1/namespaces/ns/pods"
        )
        .is_ok());
        assert!(authorize(
            &Identity::Certificate,
            &Method::GET,
            "/api/v1/namespaces/ns/pods/p/exec"
        )
        .is_ok());
    }
}
