//! Watch plumbing shared by the in-process backends (memory and SQLite).
//!
//! A watcher subscribes to the live broadcast *before* it reads history, so
//! no committed event can fall between the two; duplicates are dropped by
//! revision. A watcher that lags behind the broadcast buffer does not fail:
//! it goes back to reading history from the last revision it delivered, and
//! only fails with `Compacted` if that history is gone.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::{Event, StoreError, WatchStream};

/// How many events a watcher may fall behind before it re-reads history.
/// The ring keeps its last events (values included) alive, so it is kept
/// small: a watcher that falls behind it loses nothing, it just reads the
/// gap from the store.
pub(crate) const LIVE_BUFFER: usize = 1024;

/// How many history events one replay step reads.
const REPLAY_PAGE: usize = 1000;

/// Reads committed events from a backend's history.
#[async_trait::async_trait]
pub(crate) trait History: Send + Sync + 'static {
    /// Events under `prefix` with revision > `after`, in revision order, at
    /// most `limit`. Fails with Compacted if `after` is older than history.
    async fn events_after(
        &self,
        prefix: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;
}

/// True when `key` lies under `prefix`.
pub(crate) fn under(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix)
}

/// The two phases of a watcher.
enum Phase {
    /// Reading stored history until it runs dry; entered at start and
    /// again whenever the live buffer overflowed.
    Replay,
    /// Taking events from the live broadcast.
    Live,
    /// An error was delivered or the store closed; the stream is over.
    Done,
}

struct Watcher {
    history: Arc<dyn History>,
    rx: broadcast::Receiver<Arc<Event>>,
    prefix: String,
    /// Revision of the last event delivered (or the starting point).
    last: i64,
    buf: VecDeque<Event>,
    phase: Phase,
}

/// Builds the stream for one watcher. `rx` must have been subscribed before
/// this call, and before `after` was checked against compaction.
pub(crate) fn stream(
    history: Arc<dyn History>,
    rx: broadcast::Receiver<Arc<Event>>,
    prefix: &str,
    after: i64,
) -> WatchStream {
    let w = Watcher {
        history,
        rx,
        prefix: prefix.to_owned(),
        last: after,
        buf: VecDeque::new(),
        phase: Phase::Replay,
    };
    Box::pin(futures::stream::unfold(w, |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    }))
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                return Some(Ok(ev));
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Replay => {
                    match self
                        .history
                        .events_after(&self.prefix, self.last, REPLAY_PAGE)
                        .await
                    {
                        Err(e) => {
                            self.phase = Phase::Done;
                            return Some(Err(e));
                        }
                        Ok(events) if events.is_empty() => self.phase = Phase::Live,
                        Ok(events) => {
                            for ev in events {
                                if ev.revision() > self.last {
                                    self.last = ev.revision();
                                    self.buf.push_back(ev);
                                }
                            }
                        }
                    }
                }
                Phase::Live => match self.rx.recv().await {
                    Ok(ev) => {
                        if ev.revision() > self.last && under(ev.key(), &self.prefix) {
                            self.last = ev.revision();
                            return Some(Ok((*ev).clone()));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(
                            prefix = %self.prefix,
                            skipped = n,
                            last = self.last,
                            "watcher lagged; replaying history"
                        );
                        self.phase = Phase::Replay;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.phase = Phase::Done;
                    }
                },
            }
        }
    }
}
