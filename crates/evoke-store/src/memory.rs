//! An in-memory backend: the test double for code that programs against
//! [`Backend`], and the reference the durable backends are checked against.
//! It keeps the full semantics (revisions, CAS, history reads, watch,
//! compaction) but nothing survives the process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::watch::{self, History};
use crate::{Backend, Event, KeyValue, ListOptions, ListResult, StoreError, WatchStream};

#[derive(Default)]
struct State {
    /// The latest revision; 0 for an empty store.
    revision: i64,
    /// History at or below this revision is gone.
    compacted: i64,
    current: BTreeMap<String, KeyValue>,
    /// Every event with revision > `compacted`, in revision order.
    log: VecDeque<Event>,
}

impl State {
    fn check_readable(&self, revision: i64) -> Result<(), StoreError> {
        if revision > self.revision {
            return Err(StoreError::FutureRevision(revision));
        }
        if revision < self.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: self.compacted,
            });
        }
        Ok(())
    }

    /// The keys under `prefix` as they were at `revision`: the current
    /// values with every later event undone.
    fn snapshot(&self, prefix: &str, revision: i64) -> BTreeMap<String, KeyValue> {
        let mut view: BTreeMap<String, KeyValue> = self
            .current
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| watch::under(k, prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ev in self.log.iter().rev() {
            if ev.revision() <= revision {
                break;
            }
            if !watch::under(ev.key(), prefix) {
                continue;
            }
            match ev {
                Event::Put { kv, prev: None } => {
                    view.remove(&kv.key);
                }
                Event::Put { prev: Some(p), .. } | Event::Delete { prev: p, .. } => {
                    view.insert(p.key.clone(), p.clone());
                }
            }
        }
        view
    }
}

/// A complete [`Backend`] held in memory. Cheap to create; use one per test.
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(watch::LIVE_BUFFER);
        Self {
            state: Arc::new(Mutex::new(State::default())),
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Applies one write under the lock and publishes it, so watchers see
    /// events in revision order.
    fn commit(&self, st: &mut State, ev: Event) {
        match &ev {
            Event::Put { kv, .. } => {
                st.current.insert(kv.key.clone(), kv.clone());
            }
            Event::Delete { prev, .. } => {
                st.current.remove(&prev.key);
            }
        }
        st.log.push_back(ev.clone());
        // No receivers is not an error: nobody is watching.
        let _ = self.tx.send(Arc::new(ev));
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave State half-written: every
    // mutation is a single insert/remove/push. So poisoning is ignorable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

struct MemHistory(Arc<Mutex<State>>);

#[async_trait::async_trait]
impl History for MemHistory {
    async fn events_after(
        &self,
        prefix: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let st = lock(&self.0);
        if after < st.compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: st.compacted,
            });
        }
        // The log is in revision order; skip to the first event after `after`.
        let start = st.log.partition_point(|e| e.revision() <= after);
        Ok(st
            .log
            .range(start..)
            .filter(|e| watch::under(e.key(), prefix))
            .take(limit)
            .cloned()
            .collect())
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().current.get(key).cloned())
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError> {
        let st = self.lock();
        let revision = opts.revision.unwrap_or(st.revision);
        st.check_readable(revision)?;
        let view = st.snapshot(prefix, revision);
        let limit = opts.limit.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut more = false;
        for (k, v) in view {
            if opts.start_after.as_deref().is_some_and(|s| k.as_str() <= s) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(v);
        }
        Ok(ListResult {
            items,
            revision,
            more,
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError> {
        crate::check_key(key)?;
        let mut st = self.lock();
        if st.current.contains_key(key) {
            return Err(StoreError::AlreadyExists(key.to_owned()));
        }
        st.revision += 1;
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: st.revision,
            mod_revision: st.revision,
        };
        self.commit(
            &mut st,
            Event::Put {
                kv: kv.clone(),
                prev: None,
            },
        );
        Ok(kv)
    }

    async fn update(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError> {
        let mut st = self.lock();
        let prev = match st.current.get(key) {
            None => return Err(StoreError::NotFound(key.to_owned())),
            Some(p) if p.mod_revision != expected => {
                return Err(StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    actual: p.mod_revision,
                })
            }
            Some(p) => p.clone(),
        };
        st.revision += 1;
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: prev.create_revision,
            mod_revision: st.revision,
        };
        self.commit(
            &mut st,
            Event::Put {
                kv: kv.clone(),
                prev: Some(prev),
            },
        );
        Ok(kv)
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue, StoreError> {
        let mut st = self.lock();
        let prev = match st.current.get(key) {
            None => return Err(StoreError::NotFound(key.to_owned())),
            Some(p) => p.clone(),
        };
        if let Some(expected) = expected {
            if prev.mod_revision != expected {
                return Err(StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    actual: prev.mod_revision,
                });
            }
        }
        st.revision += 1;
        let revision = st.revision;
        self.commit(
            &mut st,
            Event::Delete {
                prev: prev.clone(),
                revision,
            },
        );
        Ok(prev)
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, StoreError> {
        let rx = self.tx.subscribe();
        {
            let st = self.lock();
            if after < st.compacted {
                return Err(StoreError::Compacted {
                    requested: after,
                    compacted: st.compacted,
                });
            }
        }
        Ok(watch::stream(
            Arc::new(MemHistory(self.state.clone())),
            rx,
            prefix,
            after,
        ))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.lock().revision)
    }

    async fn compacted_revision(&self) -> Result<i64, StoreError> {
        Ok(self.lock().compacted)
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut st = self.lock();
        if revision > st.revision {
            return Err(StoreError::FutureRevision(revision));
        }
        if revision <= st.compacted {
            return Ok(());
        }
        st.compacted = revision;
        let keep_from = st.log.partition_point(|e| e.revision() <= revision);
        st.log.drain(..keep_from);
        Ok(())
    }
}
