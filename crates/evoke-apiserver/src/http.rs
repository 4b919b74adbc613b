//! The HTTPS front: accept TCP, finish the TLS handshake (which verifies a
//! client certificate if one is sent), then serve HTTP/1.1 or HTTP/2 on the
//! connection. Each request is authenticated (`auth.rs`), its body read with
//! a 3 MiB cap, authorized (after the body: an object a node creates names
//! itself there), and handed to the router, or to the join (`bootstrap.rs`);
//! a panic in a handler becomes a 500, not a dead server.

use std::sync::Arc;

use bytes::Bytes;
use evoke_types::status::ApiError;
use futures::FutureExt;
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::respond::{self, Reply};
use crate::{auth, route, State};

/// Requests larger than this are refused with 413, as kube-apiserver does.
pub(crate) const MAX_BODY: usize = 3 * 1024 * 1024;

pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // Who a verified client certificate names (see auth.rs), and
            // until when: the handshake checked its validity once, but a
            // connection may outlive the certificate, so every request
            // checks again (as kube-apiserver's x509 authenticator does).
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| {
                    let who = crate::tls::subject(c.as_ref())
                        .and_then(|s| auth::certificate_identity(&s));
                    (who, crate::tls::not_after(c.as_ref()).unwrap_or(i64::MIN))
                });
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let cert = cert.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(state, cert, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    state: Arc<State>,
    cert: Option<(Option<auth::Identity>, i64)>,
    req: Request<Incoming>,
) -> Reply {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let started = std::time::Instant::now();
    let public_ca = uri.path() == "/cacerts" && method == http::Method::GET;
    let cert = cert.map(|(who, not_after)| {
        if crate::tls::unix_now() > not_after {
            tracing::info!(%method, path = uri.path(), "client certificate expired on an open connection");
            None
        } else {
            who
        }
    });
    let who = auth::authenticate(req.headers(), cert, &state.token, &state.node_token);
    let reply = match who {
        None if public_ca => respond::full(200, "text/plain; charset=utf-8", state.ca_pem.clone()),
        None => {
            tracing::info!(%method, path = uri.path(), "unauthenticated request refused");
            respond::error(&ApiError::unauthorized())
        }
        Some(who) => {
            let (mut parts, body) = req.into_parts();
            match Limited::new(body, MAX_BODY).collect().await {
                Err(e) => {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        respond::error(&ApiError::new(
                            413,
                            "RequestEntityTooLarge",
                            format!(
                                "the request body is larger than the limit of {MAX_BODY} bytes"
                            ),
                        ))
                    } else {
                        respond::error(&ApiError::bad_request(format!("reading request body: {e}")))
                    }
                }
                Ok(collected) => {
                    let body = collected.to_bytes();
                    let joining = uri.path() == auth::JOIN_PATH && method == http::Method::POST;
                    match &who {
                        auth::Identity::Bootstrap if joining => {
                            return crate::bootstrap::join(&state, &body).await;
                        }
                        // A node renews its certificates with its current one.
                        auth::Identity::Node(node) if joining => {
                            return crate::bootstrap::renew(&state, node, &body).await;
                        }
                        _ => {}
                    }
                    if let Err(why) =
                        auth::authorize(&state, &who, &method, uri.path(), uri.query(), &body).await
                    {
                        tracing::info!(%method, path = uri.path(), "request forbidden");
                        return respond::error(&ApiError::new(403, "Forbidden", why));
                    }
                    // The handlers' admission (NodeRestriction) needs to know
                    // who writes.
                    parts.extensions.insert(who);
                    let req = Request::from_parts(parts, body);
                    dispatch_guarded(state, req).await
                }
            }
        }
    };
    tracing::debug!(%method, path = uri.path(), status = reply.status().as_u16(),
        ms = started.elapsed().as_millis() as u64, "request");
    reply
}

async fn dispatch_guarded(state: Arc<State>, req: Request<Bytes>) -> Reply {
    let path = req.uri().path().to_string();
    match std::panic::AssertUnwindSafe(route::dispatch(state, req))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            tracing::error!(%path, "request handler panicked");
            respond::error(&ApiError::new(
                500,
                "InternalError",
                "Internal error occurred: handler panicked",
            ))
        }
    }
}
