//! `pods/<name>/exec`, `attach` and `portforward`: the streaming
//! subresources behind `kubectl exec`, `attach` and `port-forward`.
//!
//! kubectl 1.30+ opens it as a WebSocket (`GET` with `Upgrade: websocket`
//! and the subprotocol `v5.channel.k8s.io`) and falls back to SPDY (`POST`)
//! only when that upgrade fails. The API server checks the pod and the
//! container, opens a WebSocket over TLS to the node's `/exec` endpoint with
//! its kubelet-client certificate (see `proxy.rs`; evoke-node's `stream.rs`
//! speaks the protocol),
//! and only then answers kubectl's upgrade with the subprotocol the node
//! chose. From there it relays whole messages both ways; it never looks
//! inside the channel framing.
//!
//! Errors before the upgrade (no such pod or container, container not
//! running, node unreachable) are ordinary `Status` responses, which
//! kubectl prints as it does kube-apiserver's.

use std::time::Duration;

use evoke_types::status::ApiError;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::{load, Ctx};
use crate::respond::Reply;

/// What the HTTP layer keeps of a request that asks for a protocol
/// upgrade: hyper's handle on the connection, the headers and the raw
/// query (exec repeats `command=`, which `Params` cannot hold).
pub(crate) struct Upgrade {
    on: hyper::upgrade::OnUpgrade,
    headers: http::HeaderMap,
    query: String,
}

impl Upgrade {
    /// Takes the upgrade out of `req` when it asks for one.
    pub(crate) fn take<B>(req: &mut http::Request<B>) -> Option<Upgrade> {
        if !req.headers().contains_key(http::header::UPGRADE) {
            return None;
        }
        Some(Upgrade {
            headers: req.headers().clone(),
            query: req.uri().query().unwrap_or_default().to_string(),
            on: hyper::upgrade::on(req),
        })
    }

    fn is_websocket(&self) -> bool {
        self.headers
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
            && self.headers.contains_key(http::header::SEC_WEBSOCKET_KEY)
    }
}

fn unavailable(what: String) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", what)
}

/// The node endpoint's TLS stream.
type NodeStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The WebSocket to the node's exec endpoint, and the subprotocol it chose.
async fn dial_node(
    ctx: &Ctx,
    node: &str,
    endpoint: &str,
    path: &str,
    protocols: Option<&http::HeaderValue>,
) -> Result<(WebSocketStream<NodeStream>, Option<http::HeaderValue>), ApiError> {
    let mut req = format!("wss://{endpoint}{path}")
        .into_client_request()
        .map_err(|e| ApiError::bad_request(format!("exec request for node {node}: {e}")))?;
    if let Some(p) = protocols {
        req.headers_mut()
            .insert(http::header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }
    let tcp = super::proxy::connect_node(ctx, node, endpoint).await?;
    match tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    {
        Err(_) => Err(unavailable(format!(
            "node {node} at {endpoint} did not start the exec session"
        ))),
        Ok(Ok((ws, resp))) => {
            let chosen = resp
                .headers()
                .get(http::header::SEC_WEBSOCKET_PROTOCOL)
                .cloned();
            Ok((ws, chosen))
        }
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let code = resp.status().as_u16();
            let msg = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| format!("node {node} refused the exec session ({code})"));
            Err(ApiError::new(code, super::proxy::reason_for(code), msg))
        }
        Ok(Err(e)) => Err(unavailable(format!(
            "exec session with node {node} at {endpoint}: {e}"
        ))),
    }
}

/// `GET|POST .../pods/{name}/exec`, `.../attach` (the same session
/// without a command, on the main process) and `.../portforward` (SPDY
/// tunnelled in the WebSocket, relayed the same way).
pub(crate) async fn exec(ctx: &Ctx) -> Result<Reply, ApiError> {
    let name = ctx.name().to_string();
    let ns = ctx.t.namespace.clone().unwrap_or_default();
    let upgrade = ctx.upgrade.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (_, pod) = load(ctx, &name).await?;
    let sub = ctx.t.sub.as_deref().unwrap_or("exec");
    // port-forward reaches the pod's network, not one container.
    let container = match sub {
        "portforward" => String::new(),
        _ => super::proxy::container_of(&pod, ctx.params.get("container"), &name)?,
    };
    let query = upgrade
        .as_ref()
        .map(|u| u.query.clone())
        .unwrap_or_default();
    if sub == "exec" && !form_has_command(&query) {
        return Err(ApiError::bad_request(
            "you must specify at least one command for the container",
        ));
    }
    let node = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?
        .to_string();
    let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") {
        return Err(ApiError::bad_request(format!(
            "cannot {sub} into a container in a completed pod; current phase is {phase}"
        )));
    }
    let endpoint = super::proxy::node_endpoint(ctx, &node).await?;
    let path = match sub {
        "portforward" => format!("/portForward/{ns}/{name}?{query}"),
        _ => format!("/{sub}/{ns}/{name}/{container}?{query}"),
    };
    let Some(upgrade) = upgrade.filter(Upgrade::is_websocket) else {
        // SPDY (kubectl's fallback after a failed WebSocket upgrade) or a
        // plain request. The node's checks without an upgrade give the
        // same error the WebSocket attempt got, which kubectl then shows.
        let resp = super::proxy::node_get(ctx, &node, &endpoint, &path).await?;
        if resp.status() != http::StatusCode::UPGRADE_REQUIRED {
            return Err(super::proxy::node_error(resp).await);
        }
        return Err(ApiError::bad_request(format!(
            "pods/{sub} is served over WebSocket only (kubectl 1.30+); SPDY is not supported"
        )));
    };
    let key = upgrade
        .headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let (node_ws, protocol) = dial_node(
        ctx,
        &node,
        &endpoint,
        &path,
        upgrade.headers.get(http::header::SEC_WEBSOCKET_PROTOCOL),
    )
    .await?;
    tracing::info!(pod = %format!("{ns}/{name}"), %container, %node, %sub, "session relayed");
    let on = upgrade.on;
    let sub = sub.to_string();
    tokio::spawn(async move {
        match on.await {
            Ok(upgraded) => {
                let client =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                relay(client, node_ws).await;
            }
            Err(e) => tracing::warn!(error = %e, %sub, "upgrade failed"),
        }
    });
    let body = http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut reply = http::Response::new(body);
    *reply.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = reply.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&key) {
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol {
        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    Ok(reply)
}

fn form_has_command(query: &str) -> bool {
    query.split('&').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, v)| k == "command" && !v.is_empty())
    })
}

/// Copies messages both ways until either side closes. Pings are answered
/// by each side's own WebSocket, so only data and close frames cross.
async fn relay<A, B>(a: WebSocketStream<A>, b: WebSocketStream<B>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut a_tx, mut a_rx) = a.split();
    let (mut b_tx, mut b_rx) = b.split();
    let up = async {
        while let Some(Ok(m)) = a_rx.next().await {
            match m {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(f) => {
                    let _ = b_tx.send(Message::Close(f)).await;
                    break;
                }
                m => {
                    if b_tx.send(m).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = b_tx.close().await;
    };
    let down = async {
        while let Some(Ok(m)) = b_rx.next().await {
            match m {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(f) => {
                    let _ = a_tx.send(Message::Close(f)).await;
                    break;
                }
                m => {
                    if a_tx.send(m).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = a_tx.close().await;
    };
    // Whichever side ends first ends the session.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_must_be_given() {
        assert!(form_has_command("command=ls&stdout=true"));
        assert!(form_has_command("stdout=true&command=sh&command=-c"));
        assert!(!form_has_command("stdout=true&container=c"));
        assert!(!form_has_command("command=&stdout=true"));
    }
}
