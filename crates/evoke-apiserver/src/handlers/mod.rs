//! Verbs on resources. `resource` picks the handler from the method, the
//! URL shape and `?watch`; each file holds one family: `read` (get, list,
//! tables), `write` (create, update, patch, apply), `delete`, and `sub`
//! (status, scale, binding, eviction); `proxy` and `stream` reach the node
//! (logs, exec).

mod delete;
mod proxy;
pub(crate) mod read;
mod service;
mod stream;
mod sub;
mod write;

use std::sync::Arc;

use bytes::Bytes;
use evoke_types::registry::Resource;
use evoke_types::status::ApiError;
use http::{Method, Request};
use serde_json::Value;

use crate::respond::{self, Reply};
use crate::route::{Params, Target};
use crate::{object, State};

/// Everything a handler needs about one request.
pub(crate) struct Ctx {
    pub state: Arc<State>,
    pub t: Target,
    pub params: Params,
    pub accept: String,
    pub content_type: Option<String>,
    pub user_agent: String,
    pub body: Bytes,
    /// `Warning` headers to send with the response (unknown fields).
    pub warnings: std::sync::Mutex<Vec<String>>,
    /// A protocol upgrade the client asked for (exec's WebSocket).
    pub upgrade: std::sync::Mutex<Option<stream::Upgrade>>,
    /// The node making this request (its certificate's name), for
    /// NodeRestriction; None for anyone else.
    pub node: Option<String>,
}

impl Ctx {
    /// A context for another target of the same request, with no body
    /// (pods/binding acting on the pod, deletecollection on each item).
    pub(crate) fn derived(&self, t: Target) -> Ctx {
        Ctx {
            state: self.state.clone(),
            t,
            params: self.params.clone(),
            accept: self.accept.clone(),
            content_type: self.content_type.clone(),
            user_agent: self.user_agent.clone(),
            body: Bytes::new(),
            warnings: Default::default(),
            upgrade: Default::default(),
            node: self.node.clone(),
        }
    }

    /// Applies `?fieldValidation` to `obj`: Strict refuses unknown fields,
    /// Warn (the default) collects them as warnings.
    pub(crate) fn check_fields(&self, obj: &Value) -> Result<(), ApiError> {
        let found =
            crate::compat::field_validation(self.res(), obj, self.params.get("fieldValidation"))?;
        if !found.is_empty() {
            self.warnings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(found);
        }
        Ok(())
    }

    pub(crate) fn res(&self) -> &'static Resource {
        self.t.res
    }

    /// The manager recorded in managedFields: `?fieldManager`, else the
    /// client's program name from its User-Agent, as kube does.
    pub(crate) fn manager(&self) -> String {
        if let Some(m) = self.params.get("fieldManager").filter(|m| !m.is_empty()) {
            return m.to_string();
        }
        self.user_agent
            .split('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_string()
    }

    pub(crate) fn wants_table(&self) -> bool {
        self.accept
            .split(',')
            .next()
            .is_some_and(|first| first.contains("as=Table"))
    }

    /// `Accept: ...;as=PartialObjectMetadata[List]`: metadata-only clients
    /// (kube-rs `list_metadata`, client-go metadata informers).
    pub(crate) fn wants_metadata(&self) -> bool {
        self.accept
            .split(',')
            .next()
            .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
    }

    pub(crate) fn name(&self) -> &str {
        self.t.name.as_deref().unwrap_or_default()
    }

    pub(crate) fn key(&self, name: &str) -> String {
        object::key(self.t.res, self.t.namespace.as_deref(), name)
    }
}

pub(crate) async fn resource(
    state: Arc<State>,
    t: Target,
    mut req: Request<Bytes>,
) -> Result<Reply, ApiError> {
    let upgrade = stream::Upgrade::take(&mut req);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let header = |h: http::header::HeaderName| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let node = match req.extensions().get::<crate::auth::Identity>() {
        Some(crate::auth::Identity::Node(n)) => Some(n.clone()),
        _ => None,
    };
    let ctx = Ctx {
        node,
        params: Params::parse(req.uri().query()),
        accept: header(http::header::ACCEPT).unwrap_or_default(),
        content_type: header(http::header::CONTENT_TYPE),
        user_agent: header(http::header::USER_AGENT).unwrap_or_default(),
        body: req.into_body(),
        warnings: Default::default(),
        upgrade: std::sync::Mutex::new(upgrade),
        state,
        t,
    };
    let mut reply = dispatch(&ctx, &method, &path).await?;
    let warnings = std::mem::take(&mut *ctx.warnings.lock().unwrap_or_else(|p| p.into_inner()));
    for w in warnings {
        // RFC 7234 warn-text: a quoted string with `\` escapes.
        let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            reply.headers_mut().append("warning", v);
        }
    }
    Ok(reply)
}

async fn dispatch(ctx: &Ctx, method: &Method, path: &str) -> Result<Reply, ApiError> {
    let has_name = ctx.t.name.is_some();
    let sub = ctx.t.sub.clone();
    let is_watch = ctx.t.watch_path || ctx.params.flag("watch");
    // `bindings` is a create-only resource: it binds the named pod.
    if ctx.t.res.plural == "bindings" {
        return match (method, has_name) {
            (&Method::POST, false) => sub::bind(ctx, None).await,
            _ => Err(respond::method_not_allowed(method, path)),
        };
    }
    match (method, has_name, sub.as_deref()) {
        (&Method::GET, _, None) if is_watch => crate::watch::watch(ctx).await,
        (&Method::GET, false, None) => read::list(ctx).await,
        (&Method::GET, true, None | Some("status")) => read::get(ctx).await,
        (&Method::GET, true, Some("scale")) => sub::get_scale(ctx).await,
        (&Method::GET, true, Some("log")) => proxy::logs(ctx).await,
        (&Method::GET | &Method::POST, true, Some("exec" | "attach" | "portforward")) => {
            stream::exec(ctx).await
        }
        (&Method::POST, false, None) => write::create(ctx).await,
        (&Method::POST, true, Some("binding")) => sub::bind(ctx, ctx.t.name.clone()).await,
        (&Method::POST, true, Some("eviction")) => sub::evict(ctx).await,
        (&Method::PUT, true, None | Some("status")) => write::update(ctx).await,
        (&Method::PUT, true, Some("finalize")) => write::update(ctx).await,
        (&Method::PATCH, true, None | Some("status")) => write::patch(ctx).await,
        (&Method::PUT | &Method::PATCH, true, Some("scale")) => {
            sub::update_scale(ctx, method == Method::PATCH).await
        }
        (&Method::DELETE, true, None) => delete::delete(ctx).await,
        (&Method::DELETE, false, None) if ctx.res().kind != "Namespace" => {
            delete::delete_collection(ctx).await
        }
        _ => Err(respond::method_not_allowed(method, path)),
    }
}

/// Reads one object by name, or 404.
pub(crate) async fn load(
    ctx: &Ctx,
    name: &str,
) -> Result<(evoke_store::KeyValue, Value), ApiError> {
    let key = ctx.key(name);
    let gr = ctx.res().group_resource();
    let kv = ctx
        .state
        .store
        .get(&key)
        .await
        .map_err(|e| crate::error::store_to_api(e, &gr, name))?
        .ok_or_else(|| ApiError::not_found(&gr, name))?;
    let obj = object::from_kv(&kv)?;
    Ok((kv, obj))
}
