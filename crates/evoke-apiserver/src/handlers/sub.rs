//! Subresources with their own shapes: scale (autoscaling/v1 Scale),
//! binding (assigns a pod to a node) and eviction (a policy-checked
//! delete; evoke has no PodDisruptionBudgets, so it always proceeds).

use evoke_types::status::ApiError;
use serde_json::{json, Value};

use super::delete::{delete_now, DeleteOpts};
use super::write::{finish_update, Part};
use super::{load, Ctx};
use crate::compat::{self, PatchType};
use crate::object::{self, meta_str};
use crate::respond::{self, Reply};

fn selector_string(obj: &Value) -> String {
    obj["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector_string(obj),
        },
    })
}

pub(crate) async fn get_scale(ctx: &Ctx) -> Result<Reply, ApiError> {
    let (_, obj) = load(ctx, ctx.name()).await?;
    Ok(respond::json(200, &scale_of(&obj)))
}

pub(crate) async fn update_scale(ctx: &Ctx, is_patch: bool) -> Result<Reply, ApiError> {
    let name = ctx.name().to_string();
    let gr = ctx.res().group_resource();
    for attempt in 0..5 {
        let (kv, obj) = load(ctx, &name).await?;
        let current = scale_of(&obj);
        let scale = if is_patch {
            let ty = compat::patch_type(ctx.content_type.as_deref())?;
            if ty == PatchType::Apply {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "apply is not supported on scale",
                ));
            }
            compat::apply_patch(ctx.res(), ty, &current, &ctx.body)?
        } else {
            compat::decode(&ctx.body, ctx.content_type.as_deref())?
        };
        if let Some(rv) = meta_str(&scale, "resourceVersion").filter(|r| !r.is_empty()) {
            if rv != kv.mod_revision.to_string() {
                return Err(ApiError::conflict(&gr, &name));
            }
        }
        let replicas = scale["spec"]["replicas"].as_i64().unwrap_or(0);
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                &name,
                vec![evoke_types::status::Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: {replicas}: must be greater than or equal to 0"
                    ),
                    field: "spec.replicas".into(),
                }],
            ));
        }
        let mut new = obj.clone();
        new["spec"]["replicas"] = replicas.into();
        match finish_update(ctx, &kv, &obj, new, Part::Main, true).await {
            Ok(v) => return Ok(respond::json(200, &scale_of(&v))),
            Err(e) if e.reason == "Conflict" && attempt < 4 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::conflict(&gr, &name))
}

/// `pods/<name>/binding` (or `bindings` with the pod's name in the body):
/// sets spec.nodeName once.
pub(crate) async fn bind(ctx: &Ctx, url_name: Option<String>) -> Result<Reply, ApiError> {
    let binding = compat::decode(&ctx.body, ctx.content_type.as_deref())?;
    let name = url_name
        .or_else(|| object::name(&binding).map(String::from))
        .ok_or_else(|| ApiError::bad_request("binding names no pod"))?;
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("binding target names no node"))?
        .to_string();
    let pods = evoke_types::registry::by_plural("", "v1", "pods")
        .ok_or_else(|| ApiError::new(500, "InternalError", "pods are not in the registry"))?;
    let mut pod_ctx_t = ctx.t.clone();
    pod_ctx_t.res = pods;
    pod_ctx_t.sub = None;
    let pctx = ctx.derived(pod_ctx_t);
    for attempt in 0..5 {
        let (kv, pod) = load(&pctx, &name).await?;
        if let Some(cur) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
            let mut e = ApiError::new(409, "Conflict", format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{cur}\""));
            e.name = Some(name.clone());
            return Err(e);
        }
        if meta_str(&pod, "deletionTimestamp").is_some() {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!("pod {name} is being deleted, cannot be assigned to a host"),
            ));
        }
        let mut new = pod.clone();
        new["spec"]["nodeName"] = node.clone().into();
        match finish_update(&pctx, &kv, &pod, new, Part::Main, true).await {
            Ok(_) => return Ok(respond::json(201, &respond::success_status(201))),
            Err(e) if e.reason == "Conflict" && attempt < 4 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::conflict("pods", &name))
}

/// `pods/<name>/eviction`: deletes the pod with the eviction's options.
pub(crate) async fn evict(ctx: &Ctx) -> Result<Reply, ApiError> {
    let ev = compat::decode(&ctx.body, ctx.content_type.as_deref())?;
    let mut opts = DeleteOpts::from_body(&ev["deleteOptions"]);
    opts.dry_run |= ctx.params.dry_run();
    let mut pctx_t = ctx.t.clone();
    pctx_t.sub = None;
    let pctx = ctx.derived(pctx_t);
    delete_now(&pctx, ctx.name(), &opts).await?;
    Ok(respond::json(201, &respond::success_status(201)))
}
