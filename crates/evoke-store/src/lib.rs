//! A revisioned key-value store with watch: the one place evoke's cluster
//! state lives. Keys are strings such as `/registry/pods/default/web`;
//! values are opaque bytes (the API server stores JSON). Every write bumps
//! one global revision, as etcd does, and every watcher sees the writes in
//! revision order. Start at [`Backend`]; the backends are chosen at start-up
//! by [`open`].
//!
//! - [`memory::MemoryBackend`]: the reference semantics and the test double.
//! - [`sqlite::SqliteBackend`]: the embedded default (WAL, durable commits,
//!   one writer thread with group commit).
//! - [`etcd::EtcdBackend`]: etcd's v3 API, for clusters that outgrow one
//!   machine.
//! - `watch` (private): replay-then-live watch plumbing for the in-process
//!   backends; [`compactor`]: the background task that bounds history.
//!
//! `tests/conformance.rs` is the behaviour every backend must show.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

pub mod compactor;
pub mod etcd;
pub mod memory;
pub mod sqlite;
mod watch;

pub use compactor::CompactionPolicy;
pub use etcd::EtcdBackend;
pub use memory::MemoryBackend;
pub use sqlite::SqliteBackend;

/// A stored value with the revisions that created and last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: i64,
    /// Revision of the last write to the key; the object's resourceVersion.
    pub mod_revision: i64,
}

/// One change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was created (`prev` is None) or updated.
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// A key was deleted at `revision`; `prev` is its last value.
    Delete { prev: KeyValue, revision: i64 },
}

impl Event {
    /// The revision at which this change happened.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key this change is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { prev, .. } => &prev.key,
        }
    }
}

/// Rejects keys no backend can store: the empty key (etcd backends reserve
/// their bare prefix) and keys with NUL (SQLite and etcd tools mishandle it).
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.contains('\0') {
        return Err(StoreError::InvalidKey(key.to_owned()));
    }
    Ok(())
}

/// A page of a range read, taken at one consistent revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    /// The store revision the page was read at.
    pub revision: i64,
    /// True when more keys follow the last item (pagination).
    pub more: bool,
}

/// What a caller asks of a range read.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Only keys after this one (exclusive), for `continue` tokens.
    pub start_after: Option<String>,
    /// At most this many items.
    pub limit: Option<usize>,
    /// Read as of this revision (must not be compacted); None is the latest.
    pub revision: Option<i64>,
}

/// A stream of changes. It ends when the store shuts down, and yields an
/// error if the watcher falls behind a compaction.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// key {0} already exists
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// A compare-and-swap lost: the key changed since the caller read it.
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: i64,
        actual: i64,
    },
    /// The asked-for revision has been compacted away (HTTP 410 Gone).
    #[error("revision {requested} has been compacted; the oldest available is {compacted}")]
    Compacted { requested: i64, compacted: i64 },
    /// A revision in the future.
    #[error("revision {0} is newer than the store")]
    FutureRevision(i64),
    /// An empty key or one containing NUL.
    #[error("invalid key {0:?}")]
    InvalidKey(String),
    #[error("store backend: {0}")]
    Backend(String),
}

/// The store seam. SQLite is the embedded default; etcd is for clusters
/// that outgrow one machine. Both pass the same test suite.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The value of one key, or None.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Keys under `prefix`, in key order, at one revision.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError>;

    /// Creates `key`; fails with AlreadyExists if present. Durable on return.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError>;

    /// Replaces `key` if its mod_revision is still `expected`; else Conflict.
    async fn update(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError>;

    /// Deletes `key`, if `expected` is given only at that mod_revision.
    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue, StoreError>;

    /// Changes under `prefix` with revision greater than `after`, first the
    /// ones already stored, then live ones, in revision order.
    async fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, StoreError>;

    /// The latest revision.
    async fn revision(&self) -> Result<i64, StoreError>;

    /// The oldest revision that can still be read or watched from.
    async fn compacted_revision(&self) -> Result<i64, StoreError>;

    /// Drops history older than `revision`, keeping current values.
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;
}

/// The key prefix evoke uses in a shared etcd.
pub const ETCD_PREFIX: &str = "/evoke";

/// Opens the store the server runs on: etcd when `datastore_endpoint` is an
/// `http://` or `https://` URL, else SQLite at
/// `<data_dir>/server/db/state.db`. Both compact their history in the
/// background by the default [`CompactionPolicy`]. Call this inside a tokio
/// runtime.
pub async fn open(
    data_dir: &Path,
    datastore_endpoint: Option<&str>,
) -> Result<Arc<dyn Backend>, StoreError> {
    let backend: Arc<dyn Backend> = match datastore_endpoint {
        Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
            Arc::new(EtcdBackend::connect(e, ETCD_PREFIX).await?)
        }
        Some(e) => {
            return Err(StoreError::Backend(format!(
                "datastore endpoint {e:?}: expected an etcd URL (http://HOST:PORT)"
            )))
        }
        None => {
            let path = data_dir.join("server").join("db").join("state.db");
            let b = tokio::task::spawn_blocking(move || SqliteBackend::open(path))
                .await
                .map_err(|e| StoreError::Backend(format!("open sqlite task: {e}")))??;
            Arc::new(b)
        }
    };
    Ok(backend)
}
