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
/// are dropped, as client-go's broadcaster does. The writer waits for a
/// pause in the stream ([`QUIET`], at most [`MAX_DELAY`] after the first
/// event waiting) and then writes what gathered: in a burst of pod starts
/// each start records three or four events, each a write as costly as the
/// pod's own, and on a small node they would take CPU from the starts.
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
/// The pause in new events after which the waiting ones are written.
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(50);
/// The longest an event waits for such a pause.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Waits for the next item, then takes more until none came for `quiet` or
/// `max_delay` passed since the first; None once the channel is closed and
/// empty.
async fn gather<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    quiet: std::time::Duration,
    max_delay: std::time::Duration,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let deadline = tokio::time::Instant::now() + max_delay;
    let mut batch = vec![first];
    loop {
        let until = (tokio::time::Instant::now() + quiet).min(deadline);
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            // Closed (the rest is written, then the writer ends) or a pause.
            Ok(None) | Err(_) => return Some(batch),
        }
        if tokio::time::Instant::now() >= deadline {
            return Some(batch);
        }
    }
}

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
            let mut rx = rx;
            while let Some(batch) = gather(&mut rx, QUIET, MAX_DELAY).await {
                futures::stream::iter(batch)
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
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::mpsc;

    const Q: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(1);

    /// Sends `n` items `every` apart, then keeps the channel open for `hold`.
    fn feed(tx: mpsc::Sender<u32>, n: u32, every: Duration, hold: Duration) {
        tokio::spawn(async move {
            for i in 0..n {
                tx.send(i).await.expect("send");
                tokio::time::sleep(every).await;
            }
            tokio::time::sleep(hold).await;
        });
    }

    #[tokio::test(start_paused = true)]
    async fn events_close_together_are_written_together_after_a_pause() {
        let (tx, mut rx) = mpsc::channel(64);
        feed(tx, 5, Duration::from_millis(10), Duration::from_secs(5));
        let t = tokio::time::Instant::now();
        let batch = gather(&mut rx, Q, MAX).await.expect("a batch");
        assert_eq!(batch, vec![0, 1, 2, 3, 4]);
        // The last came at 40 ms; the pause after it ends the batch.
        assert_eq!(t.elapsed(), Duration::from_millis(90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_written_at_least_every_max_delay() {
        let (tx, mut rx) = mpsc::channel(1024);
        feed(tx, 300, Duration::from_millis(10), Duration::ZERO);
        let t = tokio::time::Instant::now();
        let first = gather(&mut rx, Q, MAX).await.expect("a batch");
        assert_eq!(t.elapsed(), MAX);
        assert!((99..=101).contains(&first.len()), "{}", first.len());
        let second = gather(&mut rx, Q, MAX).await.expect("a batch");
        assert_eq!(
            second[0],
            *first.last().expect("not empty") + 1,
            "none lost"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_queue_still_gives_what_it_holds_then_ends() {
        let (tx, mut rx) = mpsc::channel(8);
        for i in 0..3 {
            tx.send(i).await.expect("send");
        }
        drop(tx);
        assert_eq!(gather(&mut rx, Q, MAX).await, Some(vec![0, 1, 2]));
        assert_eq!(gather(&mut rx, Q, MAX).await, None);
    }
}
