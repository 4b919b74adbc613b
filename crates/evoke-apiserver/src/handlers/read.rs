//! get and list, with selectors, pagination and server-side tables.

use base64::Engine;
use evoke_store::ListOptions;
use evoke_types::registry::Resource;
use evoke_types::status::ApiError;
use serde_json::{json, Value};

use super::{load, Ctx};
use crate::error::store_to_api;
use crate::object;
use crate::respond::{self, Reply};
use crate::selector::{FieldSelector, LabelSelector};
use crate::{compat, State};

pub(crate) async fn get(ctx: &Ctx) -> Result<Reply, ApiError> {
    if ctx.wants_metadata() {
        let (_, obj) = load(ctx, ctx.name()).await?;
        return Ok(respond::json(200, &object::partial(&obj)));
    }
    if !ctx.wants_table() {
        // The common case needs no parsing: the stored bytes plus the rv.
        let name = ctx.name();
        let gr = ctx.res().group_resource();
        let kv = ctx
            .state
            .store
            .get(&ctx.key(name))
            .await
            .map_err(|e| store_to_api(e, &gr, name))?
            .ok_or_else(|| ApiError::not_found(&gr, name))?;
        return Ok(respond::full(
            200,
            "application/json",
            object::kv_bytes(&kv, kv.mod_revision)?,
        ));
    }
    let (_, obj) = load(ctx, ctx.name()).await?;
    let rv = obj["metadata"]["resourceVersion"].clone();
    Ok(respond::json(
        200,
        &compat::to_table(ctx.res(), &[obj], json!({"resourceVersion": rv})),
    ))
}

/// The selectors of a list or watch request.
pub(crate) struct Filter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub(crate) fn from_ctx(ctx: &Ctx) -> Result<Self, ApiError> {
        Ok(Self {
            labels: LabelSelector::parse(ctx.params.get("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(ctx.params.get("fieldSelector").unwrap_or_default())?,
        })
    }

    /// The filter that lets every object through.
    pub(crate) fn everything() -> Self {
        Self {
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
        }
    }

    /// True when the filter lets everything through.
    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

fn encode_continue(rev: i64, start: &str) -> String {
    let raw = json!({"rv": rev, "start": start}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_continue(token: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    match (v["rv"].as_i64(), v["start"].as_str()) {
        (Some(rv), Some(s)) => Ok((rv, s.to_string())),
        _ => Err(bad()),
    }
}

/// One page of matching objects.
pub(crate) struct Page {
    pub items: Vec<Value>,
    pub revision: i64,
    /// Token for the next page, if any.
    pub next: Option<String>,
}

/// Reads matching objects of `res` under `namespace` at one revision,
/// filling up to `limit` matches (all when None).
pub(crate) async fn read_page(
    state: &State,
    res: &Resource,
    namespace: Option<&str>,
    filter: &Filter,
    limit: Option<usize>,
    start: Option<(i64, String)>,
) -> Result<Page, ApiError> {
    let prefix = object::prefix(res, namespace);
    let gr = res.group_resource();
    let (mut revision, mut after) = match start {
        Some((rv, key)) => (Some(rv), Some(key)),
        None => (None, None),
    };
    let mut items = Vec::new();
    // With a selector, a store page may hold few matches: keep reading
    // store pages until the client's page is full or the keys run out.
    loop {
        let want = limit.map(|l| l.saturating_sub(items.len()).max(1));
        let page = state
            .store
            .list(
                &prefix,
                ListOptions {
                    start_after: after.clone(),
                    limit: want.map(|w| w.max(50)).filter(|_| limit.is_some()),
                    revision,
                },
            )
            .await
            .map_err(|e| match e {
                evoke_store::StoreError::Compacted { .. } => ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ),
                other => store_to_api(other, &gr, ""),
            })?;
        revision = Some(page.revision);
        let mut last_key = None;
        let mut stopped_early = false;
        for kv in &page.items {
            last_key = Some(kv.key.clone());
            let obj = object::from_kv(kv)?;
            if filter.matches(&obj) {
                items.push(obj);
                if limit.is_some_and(|l| items.len() >= l) {
                    stopped_early =
                        kv.key != page.items.last().map(|k| k.key.clone()).unwrap_or_default();
                    break;
                }
            }
        }
        let full = limit.is_some_and(|l| items.len() >= l);
        if full {
            let more = stopped_early || page.more;
            let next = match (more, &last_key) {
                (true, Some(k)) => Some(encode_continue(page.revision, k)),
                _ => None,
            };
            return Ok(Page {
                items,
                revision: page.revision,
                next,
            });
        }
        if !page.more || last_key.is_none() {
            return Ok(Page {
                items,
                revision: page.revision,
                next: None,
            });
        }
        after = last_key;
    }
}

pub(crate) async fn list(ctx: &Ctx) -> Result<Reply, ApiError> {
    let res = ctx.res();
    let filter = Filter::from_ctx(ctx)?;
    let limit = ctx
        .params
        .int("limit")?
        .filter(|l| *l > 0)
        .map(|l| l as usize);
    let mut start = match ctx.params.get("continue").filter(|c| !c.is_empty()) {
        Some(tok) => Some(decode_continue(tok)?),
        None => None,
    };
    // An exact resourceVersion reads history; anything else reads the latest.
    if start.is_none() && ctx.params.get("resourceVersionMatch") == Some("Exact") {
        if let Some(rv) = ctx.params.int("resourceVersion")? {
            // start_after "" reads from the first key.
            start = Some((rv, String::new()));
        }
    }
    if filter.is_empty() && !ctx.wants_table() && !ctx.wants_metadata() {
        return list_raw(ctx, limit, start).await;
    }
    let page = read_page(
        &ctx.state,
        res,
        ctx.t.namespace.as_deref(),
        &filter,
        limit,
        start,
    )
    .await?;
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(n) = &page.next {
        meta["continue"] = n.clone().into();
    }
    if ctx.wants_table() {
        return Ok(respond::json(
            200,
            &compat::to_table(res, &page.items, meta),
        ));
    }
    if ctx.wants_metadata() {
        let items: Vec<Value> = page.items.iter().map(object::partial).collect();
        return Ok(respond::json(
            200,
            &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items}),
        ));
    }
    Ok(respond::json(
        200,
        &json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": meta,
            "items": page.items,
        }),
    ))
}

/// A list without selectors or tables, built from the stored bytes without
/// parsing them: the path informers and `kubectl get -o json` take.
async fn list_raw(
    ctx: &Ctx,
    limit: Option<usize>,
    start: Option<(i64, String)>,
) -> Result<Reply, ApiError> {
    let res = ctx.res();
    let (revision, start_after) = match start {
        Some((rv, key)) => (Some(rv), Some(key)),
        None => (None, None),
    };
    let page = ctx
        .state
        .store
        .list(
            &object::prefix(res, ctx.t.namespace.as_deref()),
            ListOptions { start_after, limit, revision },
        )
        .await
        .map_err(|e| match e {
            evoke_store::StoreError::Compacted { .. } => ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ),
            other => store_to_api(other, &res.group_resource(), ""),
        })?;
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if page.more && limit.is_some() {
        if let Some(last) = page.items.last() {
            meta["continue"] = encode_continue(page.revision, &last.key).into();
        }
    }
    let size: usize = page.items.iter().map(|kv| kv.value.len() + 32).sum();
    let mut body = Vec::with_capacity(size + 256);
    body.extend_from_slice(
        format!(
            r#"{{"kind":"{}List","apiVersion":"{}","metadata":{},"items":["#,
            res.kind,
            res.api_version(),
            meta
        )
        .as_bytes(),
    );
    for (i, kv) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&object::kv_bytes(kv, kv.mod_revision)?);
    }
    body.extend_from_slice(b"]}");
    Ok(respond::full(200, "application/json", body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_garbage_is_a_bad_request() {
        let t = encode_continue(42, "/registry/core/pods/d/a");
        assert_eq!(
            decode_continue(&t).expect("token"),
            (42, "/registry/core/pods/d/a".to_string())
        );
        assert_eq!(decode_continue("!!").map_err(|e| e.code), Err(400));
    }
}
