//! watch: a chunked stream of newline-delimited JSON events.
//!
//! The stream goes through these states:
//! 1. **Initial**: with `resourceVersion` unset or "0" (or
//!    `sendInitialEvents=true`), one synthetic ADDED per matching object at
//!    revision R, then (for sendInitialEvents) a BOOKMARK marking the end.
//! 2. **Live**: the store's changes after R (or after the client's
//!    resourceVersion), filtered by the selectors. An object that stops
//!    matching is reported DELETED, one that starts matching ADDED.
//! 3. **End**: at `timeoutSeconds`, when the client goes away, or after an
//!    ERROR event (410 Expired when R has been compacted).
//!
//! With `allowWatchBookmarks`, a BOOKMARK with the last delivered revision
//! is sent every `Config::bookmark_interval` (default [`BOOKMARK_EVERY`]).

use std::time::Duration;

use bytes::Bytes;
use evoke_store::{Event, StoreError};
use evoke_types::registry::Resource;
use evoke_types::status::ApiError;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::compat;
use crate::handlers::read::{read_page, Filter};
use crate::handlers::Ctx;
use crate::object;
use crate::respond::Reply;

/// How often a watch with bookmarks enabled reports its revision.
pub(crate) const BOOKMARK_EVERY: Duration = Duration::from_secs(15);
/// The watch length when the client gives no timeoutSeconds (kube picks
/// 30–60 minutes).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// How events are written for one watch.
struct Encoder {
    res: &'static Resource,
    table: bool,
    /// Objects as PartialObjectMetadata.
    metadata: bool,
}

impl Encoder {
    fn event(&self, ty: &str, obj: Value) -> Bytes {
        let object = if self.table {
            let rv = obj["metadata"]["resourceVersion"].clone();
            compat::to_table(self.res, &[obj], json!({"resourceVersion": rv}))
        } else if self.metadata {
            object::partial(&obj)
        } else {
            obj
        };
        line(&json!({"type": ty, "object": object}))
    }

    fn bookmark(&self, rev: i64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(&json!({"type": "BOOKMARK", "object": {
            "kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": meta,
        }}))
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_event(e: &ApiError) -> Bytes {
    line(&json!({"type": "ERROR", "object": e.to_status()}))
}

/// The watch event type for a store change seen through `matches`, if the
/// client should see it.
fn classify(
    ev: &Event,
    matches: &dyn Fn(&Value) -> bool,
) -> Result<Option<(&'static str, Value)>, ApiError> {
    match ev {
        Event::Put { kv, prev } => {
            let new = object::from_kv(kv)?;
            let new_in = matches(&new);
            let old_in = match prev {
                Some(p) => Some(matches(&object::from_kv(p)?)),
                None => None,
            };
            Ok(match (old_in, new_in) {
                (None | Some(false), true) => Some(("ADDED", new)),
                (Some(true), true) => Some(("MODIFIED", new)),
                (Some(true), false) => Some(("DELETED", new)),
                (_, false) => None,
            })
        }
        Event::Delete { prev, revision } => {
            let mut obj = object::from_kv(prev)?;
            object::set_rv(&mut obj, *revision);
            Ok(matches(&obj).then_some(("DELETED", obj)))
        }
    }
}

/// A watch event line built from the stored bytes, for unfiltered watches.
fn raw_event(ev: &Event) -> Result<Bytes, ApiError> {
    let (ty, kv, rev) = match ev {
        Event::Put { kv, prev: None } => ("ADDED", kv, kv.mod_revision),
        Event::Put { kv, prev: Some(_) } => ("MODIFIED", kv, kv.mod_revision),
        Event::Delete { prev, revision } => ("DELETED", prev, *revision),
    };
    let obj = object::kv_bytes(kv, rev)?;
    let mut b = Vec::with_capacity(obj.len() + 32);
    b.extend_from_slice(br#"{"type":""#);
    b.extend_from_slice(ty.as_bytes());
    b.extend_from_slice(br#"","object":"#);
    b.extend_from_slice(&obj);
    b.extend_from_slice(b"}\n");
    Ok(Bytes::from(b))
}

pub(crate) async fn watch(ctx: &Ctx) -> Result<Reply, ApiError> {
    let res = ctx.res();
    let filter = Filter::from_ctx(ctx)?;
    let pinned = ctx.t.name.clone();
    // Without selectors or tables, events are spliced from stored bytes.
    let simple =
        filter.is_empty() && pinned.is_none() && !ctx.wants_table() && !ctx.wants_metadata();
    let matches = move |o: &Value| {
        filter.matches(o) && pinned.as_deref().is_none_or(|n| object::name(o) == Some(n))
    };
    let timeout = ctx
        .params
        .int("timeoutSeconds")?
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64))
        .unwrap_or(DEFAULT_TIMEOUT);
    let bookmarks = ctx.params.flag("allowWatchBookmarks");
    let send_initial = ctx.params.flag("sendInitialEvents");
    let enc = Encoder {
        res,
        table: ctx.wants_table(),
        metadata: ctx.wants_metadata(),
    };
    let namespace = ctx.t.namespace.clone();
    let rv = ctx.params.get("resourceVersion").unwrap_or_default();

    let mut first: Vec<Bytes> = Vec::new();
    let start = if rv.is_empty() || rv == "0" || send_initial {
        let page = read_page(
            &ctx.state,
            res,
            namespace.as_deref(),
            &Filter::everything(),
            None,
            None,
        )
        .await?;
        for obj in page.items.into_iter().filter(|o| matches(o)) {
            first.push(enc.event("ADDED", obj));
        }
        if send_initial {
            first.push(enc.bookmark(page.revision, true));
        }
        page.revision
    } else {
        rv.parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?
    };

    let prefix = object::prefix(res, namespace.as_deref());
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let store = ctx.state.store.clone();
    let every = ctx.state.bookmark_interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let mut stream = match store.watch(&prefix, start).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(error_event(&to_watch_error(e))).await;
                return;
            }
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut last = start;
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let out = tokio::select! {
                _ = &mut deadline => break,
                _ = tx.closed() => break,
                _ = tick.tick(), if bookmarks => enc.bookmark(last, false),
                ev = stream.next() => match ev {
                    None => break,
                    Some(Err(e)) => {
                        let _ = tx.send(error_event(&to_watch_error(e))).await;
                        break;
                    }
                    Some(Ok(ev)) if simple => {
                        last = ev.revision();
                        match raw_event(&ev) {
                            Ok(b) => b,
                            Err(e) => error_event(&e),
                        }
                    }
                    Some(Ok(ev)) => {
                        last = ev.revision();
                        match classify(&ev, &matches) {
                            Ok(Some((ty, obj))) => enc.event(ty, obj),
                            Ok(None) => continue,
                            Err(e) => error_event(&e),
                        }
                    }
                },
            };
            if tx.send(out).await.is_err() {
                break;
            }
        }
    });
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    }))
    .boxed_unsync();
    let mut reply = http::Response::new(body);
    reply.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(reply)
}

fn to_watch_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Compacted {
            requested,
            compacted,
        } => ApiError::gone(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        other => crate::error::store_to_api(other, "", ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evoke_store::KeyValue;

    fn kv(rev: i64, labels: Value) -> KeyValue {
        let v = json!({"metadata": {"name": "a", "labels": labels}});
        KeyValue {
            key: "/k/a".into(),
            value: serde_json::to_vec(&v).expect("json"),
            create_revision: 1,
            mod_revision: rev,
        }
    }

    #[test]
    fn objects_entering_and_leaving_a_selector_are_added_and_deleted() {
        let m = |o: &Value| o["metadata"]["labels"]["app"] == "web";
        let enter = Event::Put {
            kv: kv(3, json!({"app": "web"})),
            prev: Some(kv(2, json!({}))),
        };
        let stay = Event::Put {
            kv: kv(4, json!({"app": "web", "x": "y"})),
            prev: Some(kv(3, json!({"app": "web"}))),
        };
        let leave = Event::Put {
            kv: kv(5, json!({})),
            prev: Some(kv(4, json!({"app": "web"}))),
        };
        let gone = Event::Delete {
            prev: kv(5, json!({"app": "web"})),
            revision: 6,
        };
        let ty = |e: &Event| classify(e, &m).expect("classify").map(|(t, _)| t);
        assert_eq!(ty(&enter), Some("ADDED"));
        assert_eq!(ty(&stay), Some("MODIFIED"));
        assert_eq!(ty(&leave), Some("DELETED"));
        let (t, obj) = classify(&gone, &m).expect("ok").expect("event");
        assert_eq!(
            (t, obj["metadata"]["resourceVersion"].as_str()),
            ("DELETED", Some("6"))
        );
        let outside = Event::Put {
            kv: kv(7, json!({})),
            prev: None,
        };
        assert_eq!(ty(&outside), None);
    }
}
