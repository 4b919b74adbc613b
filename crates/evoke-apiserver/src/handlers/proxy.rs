//! `pods/<name>/log`: proxied to the node that runs the pod, as
//! kube-apiserver proxies to the kubelet. The node endpoint is HTTPS at the
//! Node's InternalIP and `status.daemonEndpoints.kubeletEndpoint` port (see
//! evoke-node's `server.rs`): the API server verifies the node's serving
//! certificate against the cluster CA, for that address, and presents its
//! kubelet-client certificate. The body streams through, so `logs -f`
//! follows.

use evoke_types::registry;
use evoke_types::status::ApiError;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{load, Ctx};
use crate::object;
use crate::respond::Reply;

pub(super) fn container_of(
    pod: &Value,
    asked: Option<&str>,
    name: &str,
) -> Result<String, ApiError> {
    let names: Vec<String> = ["initContainers", "containers"]
        .iter()
        .flat_map(|f| pod["spec"][*f].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    match asked.filter(|c| !c.is_empty()) {
        Some(c) if names.iter().any(|n| n == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None => {
            let main: Vec<&str> = pod["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str())
                .collect();
            match main.as_slice() {
                [one] => Ok(one.to_string()),
                _ => Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    main.join(" ")
                ))),
            }
        }
    }
}

/// The node endpoint's `host:port` for `node`.
pub(super) async fn node_endpoint(ctx: &Ctx, node: &str) -> Result<String, ApiError> {
    let nodes = registry::by_plural("", "v1", "nodes")
        .ok_or_else(|| ApiError::new(500, "InternalError", "nodes are not in the registry"))?;
    let kv = ctx
        .state
        .store
        .get(&object::key(nodes, None, node))
        .await
        .map_err(|e| crate::error::store_to_api(e, "nodes", node))?
        .ok_or_else(|| ApiError::not_found("nodes", node))?;
    let n = object::from_kv(&kv)?;
    let addrs = n["status"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ip = addrs
        .iter()
        .find(|a| a["type"] == "InternalIP")
        .or_else(|| addrs.first())
        .and_then(|a| a["address"].as_str())
        .ok_or_else(|| ApiError::bad_request(format!("node {node} reports no address")))?
        .to_string();
    let port = n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_request(format!("node {node} reports no endpoint port")))?;
    Ok(if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

fn unavailable(what: String) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", what)
}

/// A TLS connection to the node endpoint at `endpoint` (`host:port`):
/// the node must prove the certificate our CA issued it for that address;
/// we present the kubelet-client certificate.
pub(super) async fn connect_node(
    ctx: &Ctx,
    node: &str,
    endpoint: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ApiError> {
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| unavailable(format!("node {node} address {host:?}: {e}")))?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| unavailable(format!("connecting to node {node} at {endpoint}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(ctx.state.kubelet_tls.clone())
            .connect(name, tcp)
            .await
            // Not a passing outage (503 makes clients retry): the node is
            // not who it should be, as kube-apiserver's x509 errors are 500s.
            .map_err(|e| {
                ApiError::new(
                    500,
                    "InternalError",
                    format!(
                        "tls with node {node} at {endpoint} (its certificate must be issued by this cluster's ca for that address): {e}"
                    ),
                )
            })
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| unavailable(format!("node {node} at {endpoint} did not answer")))?
}

/// A GET on the node endpoint over TLS; the response body streams.
pub(super) async fn node_get(
    ctx: &Ctx,
    node: &str,
    endpoint: &str,
    uri: &str,
) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
    let tls = connect_node(ctx, node, endpoint).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unavailable(format!("node {node}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(uri)
        .header(http::header::HOST, endpoint)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| ApiError::bad_request(format!("request to node {node}: {e}")))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| unavailable(format!("node {node}: {e}")))
}

/// A node's error response as the API error kubectl prints.
pub(super) async fn node_error(resp: http::Response<hyper::body::Incoming>) -> ApiError {
    let code = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let msg = String::from_utf8_lossy(&body).trim().to_string();
    ApiError::new(code, reason_for(code), msg)
}

/// The Status reason for a node's HTTP error code.
pub(super) fn reason_for(code: u16) -> &'static str {
    match code {
        404 => "NotFound",
        401 | 403 => "Forbidden",
        500.. => "InternalError",
        _ => "BadRequest",
    }
}

pub(crate) async fn logs(ctx: &Ctx) -> Result<Reply, ApiError> {
    let name = ctx.name().to_string();
    let ns = ctx.t.namespace.clone().unwrap_or_default();
    let (_, pod) = load(ctx, &name).await?;
    let container = container_of(&pod, ctx.params.get("container"), &name)?;
    let node = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?
        .to_string();
    let endpoint = node_endpoint(ctx, &node).await?;
    let mut query = Vec::new();
    for flag in ["follow", "previous", "timestamps"] {
        if ctx.params.flag(flag) {
            query.push(format!("{flag}=true"));
        }
    }
    for num in ["tailLines", "limitBytes", "sinceSeconds"] {
        if let Some(v) = ctx.params.int(num)? {
            query.push(format!("{num}={v}"));
        }
    }
    if let Some(t) = ctx.params.get("sinceTime").filter(|t| !t.is_empty()) {
        // Percent-encoded: an RFC 3339 offset holds '+' and ':'.
        let t: String = t
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        query.push(format!("sinceTime={t}"));
    }
    let uri = format!("/containerLogs/{ns}/{name}/{container}?{}", query.join("&"));
    let resp = node_get(ctx, &node, &endpoint, &uri).await?;
    if !resp.status().is_success() {
        return Err(node_error(resp).await);
    }
    let body = resp
        .into_body()
        .map_err(std::io::Error::other)
        .boxed_unsync();
    let mut reply = http::Response::new(body);
    reply.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_only_container_is_chosen_and_several_need_a_name() {
        let one = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(container_of(&one, None, "p").expect("one"), "a");
        let two = json!({"spec": {"initContainers": [{"name": "init"}], "containers": [{"name": "a"}, {"name": "b"}]}});
        let e = container_of(&two, None, "p").expect_err("ambiguous");
        assert!(e.message.contains("choose one of: [a b]"), "{}", e.message);
        assert_eq!(container_of(&two, Some("init"), "p").expect("init"), "init");
        assert_eq!(
            container_of(&two, Some("zz"), "p").map_err(|e| e.code),
            Err(400)
        );
    }
}
