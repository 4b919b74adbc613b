//! create, update (PUT), patch (JSON, merge, strategic) and server-side
//! apply. All writes end in [`create_object`] or [`finish_update`], which
//! keep the metadata rules (uid, timestamps, generation, resourceVersion
//! preconditions) in one place.

use evoke_store::{KeyValue, StoreError};
use evoke_types::registry::{self, Resource};
use evoke_types::status::ApiError;
use serde_json::Value;

use super::{load, Ctx};
use crate::compat::{self, PatchType};
use crate::error::store_to_api;
use crate::object::{self, meta_mut, meta_str};
use crate::respond::{self, Reply};

/// Refuses a body whose apiVersion or kind is not the URL's resource.
pub(crate) fn check_kind(res: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let want = res.api_version();
    if let Some(v) = obj.get("apiVersion").and_then(Value::as_str) {
        if v != want {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({want})"
            )));
        }
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str) {
        if k != res.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind
            )));
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), want.into());
        o.insert("kind".into(), res.kind.into());
    }
    Ok(())
}

/// Fails unless namespace `ns` exists and is not being deleted.
async fn check_namespace(ctx: &Ctx, ns: &str, name: &str) -> Result<(), ApiError> {
    let nsres = registry::by_plural("", "v1", "namespaces")
        .ok_or_else(|| ApiError::new(500, "InternalError", "namespaces are not in the registry"))?;
    let key = object::key(nsres, None, ns);
    let kv = ctx
        .state
        .store
        .get(&key)
        .await
        .map_err(|e| store_to_api(e, "namespaces", ns))?
        .ok_or_else(|| ApiError::not_found("namespaces", ns))?;
    let obj = object::from_kv(&kv)?;
    if meta_str(&obj, "deletionTimestamp").is_some() || obj["status"]["phase"] == "Terminating" {
        let mut e = ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                ctx.res().group_resource()
            ),
        );
        e.name = Some(name.to_string());
        return Err(e);
    }
    Ok(())
}

fn has_spec(obj: &Value) -> bool {
    obj.get("spec").is_some()
}

pub(crate) async fn create(ctx: &Ctx) -> Result<Reply, ApiError> {
    let mut obj = compat::decode(&ctx.body, ctx.content_type.as_deref())?;
    check_kind(ctx.res(), &mut obj)?;
    ctx.check_fields(&obj)?;
    let created = create_object(ctx, obj, true).await?;
    Ok(respond::json(201, &created))
}

/// Stores a new object: namespace checks, generateName, uid, timestamps,
/// defaulting, validation, managedFields (when `record`), dryRun.
pub(crate) async fn create_object(
    ctx: &Ctx,
    mut obj: Value,
    record: bool,
) -> Result<Value, ApiError> {
    let res = ctx.res();
    let now = object::now();
    let body_ns = meta_str(&obj, "namespace").map(String::from);
    if res.namespaced {
        let ns = ctx.t.namespace.clone().ok_or_else(|| {
            ApiError::bad_request("a namespace is required to create a namespaced object")
        })?;
        if body_ns.as_deref().is_some_and(|b| !b.is_empty() && b != ns) {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        meta_mut(&mut obj).insert("namespace".into(), ns.into());
    } else {
        meta_mut(&mut obj).remove("namespace");
    }
    let generate = object::name(&obj).is_none()
        && meta_str(&obj, "generateName").is_some_and(|g| !g.is_empty());
    {
        let m = meta_mut(&mut obj);
        for f in [
            "resourceVersion",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            m.remove(f);
        }
        m.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        m.insert("creationTimestamp".into(), now.clone().into());
    }
    if has_spec(&obj) {
        meta_mut(&mut obj).insert("generation".into(), 1.into());
    }
    // A new workload starts with no status, whatever the body says (a
    // `kubectl get -o yaml | kubectl replace --force` carries the old
    // one), as kube-apiserver's strategies reset it on create; a Pod's is
    // then defaulted to Pending. Nodes keep theirs: a kubelet registers
    // with its status.
    if matches!(
        (res.group, res.kind),
        ("", "Pod") | ("apps", "Deployment") | ("apps", "ReplicaSet")
    ) {
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
    }
    if res.kind == "Namespace" {
        let name = object::name(&obj).unwrap_or_default().to_string();
        let m = meta_mut(&mut obj);
        let labels = m.entry("labels").or_insert_with(|| serde_json::json!({}));
        if let Some(l) = labels.as_object_mut() {
            l.insert("kubernetes.io/metadata.name".into(), name.into());
        }
        obj["status"] = serde_json::json!({"phase": "Active"});
    }
    // Services get their addresses under a lock held until they are stored.
    let _service_guard = if res.kind == "Service" {
        Some(ctx.state.service_lock.lock().await)
    } else {
        None
    };
    // A generated name may collide; try a few suffixes like kube does.
    for attempt in 0..3 {
        let mut candidate = obj.clone();
        if generate {
            let base = meta_str(&obj, "generateName")
                .unwrap_or_default()
                .to_string();
            meta_mut(&mut candidate).insert(
                "name".into(),
                format!("{base}{}", object::random_suffix()).into(),
            );
        }
        compat::default_object(res, &mut candidate);
        if res.kind == "Service" {
            super::service::allocate(&ctx.state, res, &mut candidate).await?;
        }
        compat::validate(res, &candidate, None)?;
        admit(ctx, None, &candidate)?;
        let name = object::name(&candidate).unwrap_or_default().to_string();
        if let Some(ns) = &ctx.t.namespace {
            if res.namespaced {
                check_namespace(ctx, ns, &name).await?;
            }
        }
        if record {
            compat::record_update(res, None, &mut candidate, &ctx.manager(), &now);
        }
        if ctx.params.dry_run() {
            return Ok(candidate);
        }
        match ctx
            .state
            .store
            .create(&ctx.key(&name), object::to_bytes(&candidate))
            .await
        {
            Ok(kv) => {
                object::set_rv(&mut candidate, kv.mod_revision);
                tracing::debug!(resource = res.plural, %name, rv = kv.mod_revision, "created");
                if res.kind == "Namespace" {
                    create_default_service_account(ctx, &name).await;
                }
                return Ok(candidate);
            }
            Err(StoreError::AlreadyExists(_)) if generate && attempt < 2 => continue,
            Err(e) => return Err(store_to_api(e, &res.group_resource(), &name)),
        }
    }
    Err(ApiError::new(
        500,
        "InternalError",
        "could not generate a unique name",
    ))
}

/// Gives a new namespace its `default` ServiceAccount. Failing here only
/// logs: the namespace exists either way, and pods do not require it.
async fn create_default_service_account(ctx: &Ctx, namespace: &str) {
    let Some(sa) = registry::by_plural("", "v1", "serviceaccounts") else {
        return;
    };
    let key = object::key(sa, Some(namespace), "default");
    let obj = crate::bootstrap::default_service_account(namespace);
    match ctx.state.store.create(&key, object::to_bytes(&obj)).await {
        Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
        Err(e) => {
            tracing::warn!(%namespace, error = %e, "could not create the default service account")
        }
    }
}

/// Which part of the object an update may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Everything but status (when the kind has a status subresource).
    Main,
    /// Only status, through `/status`.
    Status,
    /// Only a namespace's spec.finalizers, through `/finalize`.
    Finalize,
}

/// Every finalizer holding `obj`: metadata.finalizers, plus a namespace's
/// spec.finalizers (which its controller clears through `/finalize`).
pub(crate) fn all_finalizers(obj: &Value) -> Vec<String> {
    let mut f = object::finalizers(obj);
    if obj["kind"] == "Namespace" {
        if let Some(a) = obj["spec"]["finalizers"].as_array() {
            f.extend(a.iter().filter_map(|v| v.as_str().map(String::from)));
        }
    }
    f
}

/// The object as compared for a no-op write: without its resourceVersion
/// and without managedFields timestamps, which alone are no change.
fn without_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        if let Some(entries) = m.get_mut("managedFields").and_then(Value::as_array_mut) {
            for e in entries.iter_mut().filter_map(Value::as_object_mut) {
                e.remove("time");
            }
        }
    }
    v
}

/// NodeRestriction: a node writing its own Node object may not change
/// protected labels or (after creation) taints; see
/// [`crate::auth::admit_node_object`]. Who may write which object at all
/// was decided before (the node authorizer).
fn admit(ctx: &Ctx, old: Option<&Value>, new: &Value) -> Result<(), ApiError> {
    match &ctx.node {
        Some(node) if ctx.res().kind == "Node" => crate::auth::admit_node_object(node, old, new)
            .map_err(|why| ApiError::new(403, "Forbidden", why)),
        _ => Ok(()),
    }
}

/// Writes `new` over `old` (read at `kv`), keeping what clients may not
/// change. A no-op update writes nothing. Removing the last finalizer of an
/// object being deleted deletes it.
pub(crate) async fn finish_update(
    ctx: &Ctx,
    kv: &KeyValue,
    old: &Value,
    mut new: Value,
    part: Part,
    record: bool,
) -> Result<Value, ApiError> {
    let res = ctx.res();
    let name = object::name(old).unwrap_or_default().to_string();
    match object::name(&new) {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )))
        }
        _ => {}
    }
    if part == Part::Finalize {
        let mut merged = old.clone();
        merged["spec"]["finalizers"] = new["spec"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into();
        new = merged;
    } else if part == Part::Status {
        let mut merged = old.clone();
        merged["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        if merged["status"].is_null() {
            if let Some(o) = merged.as_object_mut() {
                o.remove("status");
            }
        }
        new = merged;
    } else if res.subresources.contains(&"status") {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
    }
    check_kind(res, &mut new)?;
    {
        let old_meta = old["metadata"].clone();
        let m = meta_mut(&mut new);
        m.insert("name".into(), name.clone().into());
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "generation",
        ] {
            match old_meta.get(f) {
                Some(v) => m.insert(f.into(), v.clone()),
                None => m.remove(f),
            };
        }
        if !m.contains_key("managedFields") {
            if let Some(mf) = old_meta.get("managedFields") {
                m.insert("managedFields".into(), mf.clone());
            }
        }
        m.insert("resourceVersion".into(), kv.mod_revision.to_string().into());
    }
    if new.get("spec") != old.get("spec") && has_spec(&new) {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        meta_mut(&mut new).insert("generation".into(), g.into());
    }
    if part != Part::Finalize {
        compat::default_object(res, &mut new);
    }
    compat::validate(res, &new, Some(old))?;
    admit(ctx, Some(old), &new)?;
    if without_rv(&new) == without_rv(old) {
        return Ok(old.clone());
    }
    if record {
        compat::record_update(res, Some(old), &mut new, &ctx.manager(), &object::now());
    }
    if ctx.params.dry_run() {
        return Ok(new);
    }
    let key = ctx.key(&name);
    let gr = res.group_resource();
    let grace_zero = new["metadata"]["deletionGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(0)
        == 0;
    if meta_str(&new, "deletionTimestamp").is_some()
        && object::finalizers(&new).is_empty()
        && grace_zero
    {
        ctx.state
            .store
            .delete(&key, Some(kv.mod_revision))
            .await
            .map_err(|e| store_to_api(e, &gr, &name))?;
        return Ok(new);
    }
    let stored = ctx
        .state
        .store
        .update(&key, kv.mod_revision, object::to_bytes(&new))
        .await
        .map_err(|e| store_to_api(e, &gr, &name))?;
    object::set_rv(&mut new, stored.mod_revision);
    Ok(new)
}

fn rv_precondition(new: &Value, kv: &KeyValue, gr: &str, name: &str) -> Result<(), ApiError> {
    match meta_str(new, "resourceVersion") {
        Some(rv) if !rv.is_empty() && rv != kv.mod_revision.to_string() => {
            Err(ApiError::conflict(gr, name))
        }
        _ => Ok(()),
    }
}

fn part_of(ctx: &Ctx) -> Part {
    match ctx.t.sub.as_deref() {
        Some("status") => Part::Status,
        Some("finalize") => Part::Finalize,
        _ => Part::Main,
    }
}

/// Kinds whose PUT creates a missing object, as in kube-apiserver.
const CREATE_ON_UPDATE: &[&str] = &["Endpoints", "Lease", "Event"];

pub(crate) async fn update(ctx: &Ctx) -> Result<Reply, ApiError> {
    let res = ctx.res();
    let mut new = compat::decode(&ctx.body, ctx.content_type.as_deref())?;
    check_kind(res, &mut new)?;
    ctx.check_fields(&new)?;
    let name = ctx.name().to_string();
    match object::name(&new) {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )))
        }
        Some(_) => {}
        None => {
            meta_mut(&mut new).insert("name".into(), name.clone().into());
        }
    }
    let (kv, old) = match load(ctx, &name).await {
        // Kinds kube lets a PUT create (its AllowCreateOnUpdate).
        Err(e) if e.code == 404 && ctx.t.sub.is_none() && CREATE_ON_UPDATE.contains(&res.kind) => {
            let created = create_object(ctx, new, true).await?;
            return Ok(respond::json(201, &created));
        }
        r => r?,
    };
    rv_precondition(&new, &kv, &res.group_resource(), &name)?;
    let out = finish_update(ctx, &kv, &old, new, part_of(ctx), true).await?;
    Ok(respond::json(200, &out))
}

pub(crate) async fn patch(ctx: &Ctx) -> Result<Reply, ApiError> {
    let res = ctx.res();
    let ty = compat::patch_type(ctx.content_type.as_deref())?;
    let name = ctx.name().to_string();
    let gr = res.group_resource();
    // A patch without a resourceVersion applies to whatever is current, so
    // a lost race is retried here rather than reported.
    for attempt in 0..5 {
        let current = match load(ctx, &name).await {
            Ok(c) => Some(c),
            Err(e) if e.code == 404 => None,
            Err(e) => return Err(e),
        };
        let result = if ty == PatchType::Apply {
            apply(ctx, current, &name).await
        } else {
            let (kv, old) = current.ok_or_else(|| ApiError::not_found(&gr, &name))?;
            let new = compat::apply_patch(res, ty, &old, &ctx.body)?;
            if attempt == 0 {
                ctx.check_fields(&new)?;
            }
            rv_precondition(&new, &kv, &gr, &name)?;
            finish_update(ctx, &kv, &old, new, part_of(ctx), true)
                .await
                .map(|v| (200, v))
        };
        match result {
            Err(e) if e.reason == "Conflict" && attempt < 4 => continue,
            Err(e) if e.reason == "AlreadyExists" && ty == PatchType::Apply && attempt < 4 => {
                continue
            }
            Err(e) => return Err(e),
            Ok((code, v)) => return Ok(respond::json(code, &v)),
        }
    }
    Err(ApiError::conflict(&gr, &name))
}

/// Server-side apply: create when absent, else merge by field ownership.
async fn apply(
    ctx: &Ctx,
    current: Option<(KeyValue, Value)>,
    name: &str,
) -> Result<(u16, Value), ApiError> {
    let res = ctx.res();
    let manager = ctx
        .params
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            )
        })?
        .to_string();
    let force = ctx.params.flag("force");
    let mut applied = compat::decode(&ctx.body, Some("application/apply-patch+yaml"))?;
    check_kind(res, &mut applied)?;
    ctx.check_fields(&applied)?;
    match object::name(&applied) {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )))
        }
        _ => {}
    }
    let now = object::now();
    match current {
        None => {
            let mut obj = compat::server_side_apply(res, None, &applied, &manager, force, &now)?;
            meta_mut(&mut obj).insert("name".into(), name.into());
            create_object(ctx, obj, false).await.map(|v| (201, v))
        }
        Some((kv, old)) => {
            rv_precondition(&applied, &kv, &res.group_resource(), name)?;
            let new = compat::server_side_apply(res, Some(&old), &applied, &manager, force, &now)?;
            finish_update(ctx, &kv, &old, new, part_of(ctx), false)
                .await
                .map(|v| (200, v))
        }
    }
}
