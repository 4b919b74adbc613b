//! delete and deletecollection: preconditions, propagationPolicy
//! finalizers, finalizers holding an object with a deletionTimestamp, and
//! graceful deletion of pods that a node runs.

use evoke_types::status::ApiError;
use serde_json::{json, Value};

use super::read::{read_page, Filter};
use super::write::all_finalizers;
use super::{load, Ctx};
use crate::error::store_to_api;
use crate::object::{self, meta_mut, meta_str};
use crate::respond::{self, Reply};

/// What a DeleteOptions body and the query ask for.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeleteOpts {
    pub grace: Option<i64>,
    pub propagation: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

impl DeleteOpts {
    pub(crate) fn from_body(body: &Value) -> Self {
        Self {
            grace: body["gracePeriodSeconds"].as_i64(),
            propagation: body["propagationPolicy"].as_str().map(String::from),
            uid: body["preconditions"]["uid"].as_str().map(String::from),
            resource_version: body["preconditions"]["resourceVersion"]
                .as_str()
                .map(String::from),
            dry_run: body["dryRun"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "All")),
        }
    }

    fn parse(ctx: &Ctx) -> Result<Self, ApiError> {
        let body: Value = if ctx.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            crate::compat::decode(&ctx.body, ctx.content_type.as_deref()).or_else(|_| {
                serde_json::from_slice(&ctx.body)
                    .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))
            })?
        };
        let mut o = Self::from_body(&body);
        if let Some(g) = ctx.params.int("gracePeriodSeconds")? {
            o.grace = Some(g);
        }
        if let Some(p) = ctx.params.get("propagationPolicy") {
            o.propagation = Some(p.to_string());
        }
        o.dry_run |= ctx.params.dry_run();
        match o.propagation.as_deref() {
            None | Some("Orphan" | "Foreground" | "Background") => Ok(o),
            Some(p) => Err(ApiError::bad_request(format!(
                "invalid propagationPolicy {p:?}"
            ))),
        }
    }
}

const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

pub(crate) async fn delete(ctx: &Ctx) -> Result<Reply, ApiError> {
    let opts = DeleteOpts::parse(ctx)?;
    let name = ctx.name().to_string();
    if ctx.res().kind == "Namespace" && PROTECTED_NAMESPACES.contains(&name.as_str()) {
        let mut e = ApiError::new(
            403,
            "Forbidden",
            format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
        );
        e.name = Some(name);
        return Err(e);
    }
    let out = delete_now(ctx, &name, &opts).await?;
    Ok(respond::json(200, &out))
}

fn precondition_failed(what: &str, want: &str, got: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Precondition failed: {what} in precondition: {want}, {what} in object meta: {got}"
        ),
    )
}

/// Deletes object `name` of the request's resource, as kube does: it may
/// only be marked (finalizers, pod grace) and stay until they clear.
pub(crate) async fn delete_now(
    ctx: &Ctx,
    name: &str,
    opts: &DeleteOpts,
) -> Result<Value, ApiError> {
    let res = ctx.res();
    let gr = res.group_resource();
    let key = ctx.key(name);
    for _attempt in 0..5 {
        let (kv, obj) = load(ctx, name).await?;
        if let Some(uid) = &opts.uid {
            let got = meta_str(&obj, "uid").unwrap_or_default();
            if uid != got {
                return Err(precondition_failed("UID", uid, got));
            }
        }
        if let Some(rv) = &opts.resource_version {
            let got = kv.mod_revision.to_string();
            if *rv != got {
                return Err(precondition_failed("ResourceVersion", rv, &got));
            }
        }
        let mut new = obj.clone();
        let already = meta_str(&obj, "deletionTimestamp").is_some();
        let finalizer = match opts.propagation.as_deref() {
            Some("Orphan") => Some("orphan"),
            Some("Foreground") => Some("foregroundDeletion"),
            _ => None,
        };
        if let Some(f) = finalizer.filter(|_| !already) {
            let mut fins = object::finalizers(&new);
            if !fins.iter().any(|x| x == f) {
                fins.push(f.to_string());
                meta_mut(&mut new).insert("finalizers".into(), json!(fins));
            }
        }
        let now = chrono::Utc::now();
        let mut grace = 0;
        if res.kind == "Pod" {
            let on_node = obj["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let done = matches!(
                obj["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            );
            grace = opts
                .grace
                .or(obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .max(0);
            if !on_node || done {
                grace = 0;
            }
            let current_grace = obj["metadata"]["deletionGracePeriodSeconds"].as_i64();
            if already && grace > 0 && current_grace.is_some_and(|c| c <= grace) {
                return Ok(obj);
            }
        }
        let fins = all_finalizers(&new);
        if grace > 0 || !fins.is_empty() {
            // A namespace being deleted says so in its phase; the namespace
            // controller empties it, then clears spec.finalizers.
            if res.kind == "Namespace" {
                new["status"]["phase"] = "Terminating".into();
            }
            let m = meta_mut(&mut new);
            if grace > 0 || !already {
                let at = now + chrono::Duration::seconds(grace);
                m.insert("deletionTimestamp".into(), object::timestamp(at).into());
                m.insert("deletionGracePeriodSeconds".into(), grace.into());
            }
            if new == obj || opts.dry_run {
                return Ok(new);
            }
            match ctx
                .state
                .store
                .update(&key, kv.mod_revision, object::to_bytes(&new))
                .await
            {
                Ok(stored) => {
                    object::set_rv(&mut new, stored.mod_revision);
                    return Ok(new);
                }
                Err(evoke_store::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_to_api(e, &gr, name)),
            }
        }
        if opts.dry_run {
            return Ok(obj);
        }
        match ctx.state.store.delete(&key, Some(kv.mod_revision)).await {
            Ok(_) => {
                tracing::debug!(resource = res.plural, %name, "deleted");
                return Ok(obj);
            }
            Err(evoke_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(store_to_api(e, &gr, name)),
        }
    }
    Err(ApiError::conflict(&gr, name))
}

pub(crate) async fn delete_collection(ctx: &Ctx) -> Result<Reply, ApiError> {
    let opts = DeleteOpts::parse(ctx)?;
    let filter = Filter::from_ctx(ctx)?;
    let res = ctx.res();
    let page = read_page(
        &ctx.state,
        res,
        ctx.t.namespace.as_deref(),
        &filter,
        None,
        None,
    )
    .await?;
    let mut deleted = Vec::new();
    for obj in page.items {
        let name = object::name(&obj).unwrap_or_default().to_string();
        let mut sub = ctx.derived(ctx.t.clone());
        sub.t.namespace = meta_str(&obj, "namespace")
            .map(String::from)
            .or(sub.t.namespace);
        match delete_now(&sub, &name, &opts).await {
            Ok(v) => deleted.push(v),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(respond::json(
        200,
        &json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": page.revision.to_string()},
            "items": deleted,
        }),
    ))
}
