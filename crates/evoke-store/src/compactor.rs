//! The background compactor: keeps history bounded, as kube-apiserver's
//! periodic etcd compaction does. Every `interval` it notes the current
//! revision; it compacts to the newest noted revision that is at least
//! `retain` old, but never closer than `keep_revisions` to the head (so a
//! watcher that reconnects soon after a burst can still resume). Each pass
//! is idempotent and needs no hint about what changed.
//!
//! The SQLite and etcd backends run one by default (see their `open_with`
//! and `connect_with`); [`spawn`] runs one for any other [`Backend`].

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::{Backend, StoreError};

/// How much history to keep.
#[derive(Debug, Clone)]
pub struct CompactionPolicy {
    /// Time between passes.
    pub interval: Duration,
    /// History younger than this is kept (kube-apiserver: 5 minutes).
    pub retain: Duration,
    /// At least this many of the newest revisions are kept.
    pub keep_revisions: i64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            retain: Duration::from_secs(300),
            keep_revisions: 1000,
        }
    }
}

/// The compactor's memory between passes.
pub struct Compactor {
    policy: CompactionPolicy,
    /// (when, revision) samples, oldest first.
    samples: VecDeque<(Instant, i64)>,
}

impl Compactor {
    pub fn new(policy: CompactionPolicy) -> Self {
        Self {
            policy,
            samples: VecDeque::new(),
        }
    }

    /// One pass: samples the revision and compacts if something is due.
    /// Returns the revision compacted to, if it compacted.
    pub async fn pass(&mut self, backend: &dyn Backend) -> Result<Option<i64>, StoreError> {
        let head = backend.revision().await?;
        let compacted = backend.compacted_revision().await?;
        let Some(target) = self.decide(Instant::now(), head, compacted) else {
            return Ok(None);
        };
        backend.compact(target).await?;
        tracing::info!(revision = target, head, "compacted store history");
        Ok(Some(target))
    }

    /// Notes `head` as seen at `now` and returns the revision to compact
    /// to, if any is due.
    pub fn decide(&mut self, now: Instant, head: i64, compacted: i64) -> Option<i64> {
        self.samples.push_back((now, head));
        // The newest sample that is old enough; drop the ones before it.
        let mut target = None;
        while let Some(&(at, rev)) = self.samples.front() {
            if now.duration_since(at) < self.policy.retain {
                break;
            }
            target = Some(rev);
            self.samples.pop_front();
        }
        let target = target?.min(head - self.policy.keep_revisions);
        (target > compacted).then_some(target)
    }

    /// Time between passes.
    pub fn interval(&self) -> Duration {
        self.policy.interval
    }
}

/// Runs a [`Compactor`] every `policy.interval` until the backend is
/// dropped. A failed pass is logged and retried on the next tick.
pub fn spawn(backend: &Arc<dyn Backend>, policy: CompactionPolicy) -> tokio::task::JoinHandle<()> {
    let weak: Weak<dyn Backend> = Arc::downgrade(backend);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(policy.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut compactor = Compactor::new(policy);
        loop {
            ticker.tick().await;
            let Some(backend) = weak.upgrade() else {
                tracing::debug!("store dropped; compactor stops");
                return;
            };
            if let Err(e) = compactor.pass(backend.as_ref()).await {
                tracing::warn!(error = %e, "store compaction failed; retrying next tick");
            }
        }
    })
}
