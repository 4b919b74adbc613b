//! Watch caches shared by the controllers: one reflector per kind, plus a
//! change counter every interested controller can wait on.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// A watch cache of one kind.
#[derive(Clone)]
pub struct Informer<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    changed: watch::Receiver<u64>,
    /// True once the first list is in the store. (The store's own
    /// `wait_until_ready` wakes only one of several concurrent waiters.)
    ready: watch::Receiver<bool>,
}

impl<K> Informer<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    /// Starts watching `api` in the background.
    pub fn spawn(api: Api<K>, config: watcher::Config) -> Informer<K> {
        let (store, writer) = reflector::store();
        let (tx, rx) = watch::channel(0u64);
        let (ready_tx, ready_rx) = watch::channel(false);
        let kind = K::kind(&Default::default()).into_owned();
        tokio::spawn(async move {
            // managedFields are for apply conflicts, which no controller
            // looks at; parsed, they are a large share of each cached pod.
            // (An update without them keeps the stored ones.)
            let events = watcher(api, config)
                .default_backoff()
                .modify(|o: &mut K| o.meta_mut().managed_fields = None);
            let mut stream = reflector::reflector(writer, events).boxed();
            let mut n = 0u64;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Init) | Ok(watcher::Event::InitApply(_)) => {}
                    Ok(ev) => {
                        if matches!(ev, watcher::Event::InitDone) {
                            let _ = ready_tx.send(true);
                        }
                        n += 1;
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(%kind, error = %e, "watch error; retrying"),
                }
            }
        });
        Informer {
            store,
            changed: rx,
            ready: ready_rx,
        }
    }

    /// Waits until the first list is in the cache.
    pub async fn ready(&self) {
        let mut r = self.ready.clone();
        let _ = r.wait_for(|ready| *ready).await;
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }
}

/// Runs `step` whenever one of `triggers` fires and at least every
/// `resync`, forever, but not more often than every `batch` (events in
/// between are handled together). Level-triggered: the step looks at the
/// whole cache, never at what changed.
pub async fn run_loop<F, Fut>(
    name: &'static str,
    mut triggers: Vec<watch::Receiver<u64>>,
    resync: Duration,
    batch: Duration,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    tracing::info!(controller = name, "controller started");
    loop {
        step().await;
        let changed =
            futures::future::select_all(triggers.iter_mut().map(|t| Box::pin(t.changed())));
        tokio::select! {
            (res, _, _) = changed => {
                if res.is_err() {
                    tracing::warn!(controller = name, "a watch cache stopped; resync only");
                    tokio::time::sleep(resync).await;
                }
            }
            _ = tokio::time::sleep(resync) => {}
        }
        // Let a burst of events land before looking again.
        tokio::time::sleep(batch).await;
        for t in triggers.iter_mut() {
            t.mark_unchanged();
        }
    }
}
