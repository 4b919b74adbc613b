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

/// Whether tests must fail rather than skip when a tool is missing.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when etcd is installed; panics under CI=true when it is not,
/// else prints why the test is skipped.
pub fn etcd_available() -> bool {
    if evoke_store::etcd::LocalEtcd::binary().is_some() {
        return true;
    }
    if in_ci() {
        panic!("etcd is not installed but CI=true: scripts/setup installs etcd-server");
    }
    eprintln!("skipping: etcd is not installed (apt-get install etcd-server)");
    false
}

pub async fn etcd() -> Option<(Arc<dyn Backend>, Guard)> {
    if !etcd_available() {
        return None;
    }
    let server = evoke_store::etcd::LocalEtcd::start(None)
        .await
        .expect("start local etcd");
    let b = evoke_store::EtcdBackend::connect(server.endpoint(), "/evoke-test")
        .await
        .expect("connect to etcd");
    Some((Arc::new(b), Box::new(server)))
}
