//! Recording core/v1 Events, the ones `kubectl describe` and `kubectl get
//! events` show. Shared by the scheduler, the controllers and the node agent.

use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};

/// Normal or Warning, as the Event API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Writes Events on behalf of one component (e.g. `default-scheduler`).
///
/// Events go through a bounded queue to one background writer with a few
/// requests in flight, so they never compete with the work they describe
/// (a burst of bindings goes first); when the queue is full, new events
/// are dropped, as client-go's broadcaster does.
#[derive(Clone)]
pub struct Recorder {
    component: String,
    host: Option<String>,
    tx: tokio::sync::mpsc::Sender<Event>,
}

/// Events waiting to be written, per recorder.
pub const QUEUE: usize = 4096;
/// Event writes in flight, per recorder.
const IN_FLIGHT: usize = 4;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A reference to `obj` for an Event's involvedObject.
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: obj.meta().resource_version.clone(),
        field_path: None,
    }
}

impl Recorder {
    /// A recorder whose writer runs on the current tokio runtime.
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Recorder {
        let (tx, rx) = tokio::sync::mpsc::channel::<Event>(QUEUE);
        tokio::spawn(async move {
            use futures::StreamExt;
            let events =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
                );
            events
                .for_each_concurrent(IN_FLIGHT, |ev| {
                    let client = client.clone();
                    async move {
                        let ns = ev.namespace().unwrap_or_else(|| "default".into());
                        let api: Api<Event> = Api::namespaced(client, &ns);
                        if let Err(e) = api.create(&PostParams::default(), &ev).await {
                            tracing::debug!(error = %e, "could not record event");
                        }
                    }
                })
                .await;
        });
        Recorder {
            component: component.to_string(),
            host: host.map(str::to_string),
            tx,
        }
    }

    /// Builds the Event object (pure, for tests and for callers that batch).
    pub fn build(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> Event {
        let ts = k8s_openapi::jiff::Timestamp::now();
        let now = Time(ts);
        let ns = obj
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let nanos = ts.as_nanosecond() as u64;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.{:x}",
            obj.name.as_deref().unwrap_or("unknown"),
            nanos.wrapping_add(seq)
        );
        Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(ns),
                ..Default::default()
            },
            involved_object: obj.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            type_: Some(type_.as_str().to_string()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone().unwrap_or_else(|| self.component.clone())),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        }
    }

    /// Records an Event without waiting; a failure is only logged, since
    /// an Event is advice and must never stop the work it describes.
    pub fn publish(&self, obj: &ObjectReference, type_: EventType, reason: &str, message: &str) {
        let ev = self.build(obj, type_, reason, message);
        tracing::debug!(reason, message, object = ?obj.name, "event");
        if self.tx.try_send(ev).is_err() {
            tracing::debug!(reason, "event queue full; event dropped");
        }
    }
}
