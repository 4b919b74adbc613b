//! Backend constructors for the integration tests. Each returns the backend
//! and a guard that keeps its resources (temp dir, etcd process) alive; None
//! means the backend is unavailable here and the test is skipped (never
//! when CI=true: then it panics).
#![allow(dead_code)]

use std::sync::Arc;

use evoke_store::{Backend, MemoryBackend};

pub type Guard = Box<dyn std::any::Any + Send>;

pub async fn memory() -> Option<(Arc<dyn Backend>, Guard)> {
    Some((Arc::new(MemoryBackend::new()), Box::new(())))
}

pub async fn sqlite() -> Option<(Arc<dyn Backend>, Guard)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = evoke_store::SqliteBackend::open(dir.path().join("db/state.db")).expect("open sqlite");
    Some((Arc::new(b), Box::new(dir)))
}
