//! History stays bounded: compaction removes superseded revisions, SQLite
//! reuses or returns the freed pages, and the background compactor picks
//! the revision to compact to from its retention policy.
#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use evoke_store::compactor::{self, Compactor};
use evoke_store::{Backend, CompactionPolicy, MemoryBackend, SqliteBackend, StoreError};

/// Size of the main database file; the WAL is bounded separately.
fn file_bytes(db: &Path) -> u64 {
    let wal = std::fs::metadata(format!("{}-wal", db.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        wal <= 20 * 1024 * 1024,
        "the WAL stays bounded: {wal} bytes"
    );
    std::fs::metadata(db).map(|m| m.len()).unwrap_or(0)
}

/// `rounds` updates of each of `keys` keys with 1 KiB values, from
/// concurrent writers.
async fn churn(b: &Arc<SqliteBackend>, keys: usize, rounds: usize) {
    let mut tasks = Vec::new();
    for k in 0..keys {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("/churn/{k}");
            let mut rev = match b.get(&key).await.unwrap() {
                Some(kv) => kv.mod_revision,
                None => b.create(&key, vec![0; 1024]).await.unwrap().mod_revision,
            };
            for i in 0..rounds {
                rev = b
                    .update(&key, rev, vec![i as u8; 1024])
                    .await
                    .unwrap()
                    .mod_revision;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_and_log_stay_bounded_under_churn_with_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let b = Arc::new(SqliteBackend::open(&db).unwrap());

    churn(&b, 10, 400).await;
    assert!(
        b.log_rows().await.unwrap() > 4000,
        "history is kept until compaction"
    );
    let grown = file_bytes(&db);
    b.compact(b.revision().await.unwrap()).await.unwrap();
    assert_eq!(b.log_rows().await.unwrap(), 10, "one row per live key");
    let after_first = file_bytes(&db);
    assert!(
        after_first < grown / 4,
        "compaction gave space back: {grown} -> {after_first} bytes"
    );

    // More churn of the same size, compacted again: no growth across cycles.
    for _ in 0..3 {
        churn(&b, 10, 400).await;
        b.compact(b.revision().await.unwrap()).await.unwrap();
        assert_eq!(b.log_rows().await.unwrap(), 10);
        let now = file_bytes(&db);
        assert!(
            now <= after_first + 64 * 1024,
            "file stays bounded: {now} bytes after a cycle, {after_first} after the first"
        );
    }
    b.check_integrity().await.unwrap();
    // Every key still holds its last value.
    let list = b.list("/churn/", Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 10);
    assert!(list
        .items
        .iter()
        .all(|kv| kv.value == vec![(399 % 256) as u8; 1024]));
}

#[tokio::test]
async fn compactor_keeps_the_newest_revisions_and_compacts_the_rest() {
    let b = MemoryBackend::new();
    b.create("/c/a", vec![0]).await.unwrap();
    let mut rev = b.get("/c/a").await.unwrap().unwrap().mod_revision;
    for i in 0..100u8 {
        rev = b.update("/c/a", rev, vec![i]).await.unwrap().mod_revision;
    }
    let mut c = Compactor::new(CompactionPolicy {
        interval: Duration::from_millis(10),
        retain: Duration::ZERO,
        keep_revisions: 10,
    });
    assert_eq!(c.pass(&b).await.unwrap(), Some(rev - 10));
    assert_eq!(b.compacted_revision().await.unwrap(), rev - 10);
    // Nothing new: nothing to do.
    assert_eq!(c.pass(&b).await.unwrap(), None);
    // A watch within the kept window works; before it, 410-style Compacted.
    assert!(b.watch("/c/", rev - 10).await.is_ok());
    assert!(matches!(
        b.watch("/c/", rev - 11).await,
        Err(StoreError::Compacted { .. })
    ));
}

#[tokio::test]
async fn compactor_waits_for_history_to_reach_the_retention_age() {
    let b = MemoryBackend::new();
    for i in 0..50 {
        b.create(&format!("/r/{i}"), vec![0]).await.unwrap();
    }
    let mut c = Compactor::new(CompactionPolicy {
        interval: Duration::from_millis(10),
        retain: Duration::from_secs(3600),
        keep_revisions: 0,
    });
    assert_eq!(c.pass(&b).await.unwrap(), None, "nothing is an hour old");
    assert_eq!(b.compacted_revision().await.unwrap(), 0);
}

#[tokio::test]
async fn background_compactor_runs_on_its_timer_and_stops_with_the_store() {
    let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    for i in 0..20 {
        b.create(&format!("/bg/{i}"), vec![0]).await.unwrap();
    }
    let task = compactor::spawn(
        &b,
        CompactionPolicy {
            interval: Duration::from_millis(20),
            retain: Duration::ZERO,
            keep_revisions: 5,
        },
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.compacted_revision().await.unwrap() != 15 {
        assert!(tokio::time::Instant::now() < deadline, "compactor ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("compactor stops once the store is dropped")
        .unwrap();
}

#[tokio::test]
async fn open_defaults_to_sqlite_under_the_data_dir_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let b = evoke_store::open(dir.path(), None).await.unwrap();
    let kv = b.create("/o/a", b"v".to_vec()).await.unwrap();
    drop(b);
    assert!(dir.path().join("server/db/state.db").is_file());
    // The compactor task holds only a weak reference, so the file is free.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = evoke_store::open(dir.path(), None).await.unwrap();
    assert_eq!(b.get("/o/a").await.unwrap(), Some(kv.clone()));
    assert_eq!(b.revision().await.unwrap(), kv.mod_revision);
    // History survives too: a watch from 0 replays the create.
    use futures::StreamExt;
    let mut w = b.watch("/o/", 0).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.revision(), kv.mod_revision);
}

#[tokio::test]
async fn open_rejects_an_endpoint_that_is_not_an_etcd_url() {
    let dir = tempfile::tempdir().unwrap();
    let err = evoke_store::open(dir.path(), Some("mysql://x")).await.err();
    assert!(
        matches!(&err, Some(StoreError::Backend(m)) if m.contains("mysql://x")),
        "{err:?}"
    );
}

#[tokio::test]
async fn open_uses_etcd_for_an_http_endpoint() {
    if !common::etcd_available() {
        return;
    }
    let server = evoke_store::etcd::LocalEtcd::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = evoke_store::open(dir.path(), Some(server.endpoint()))
        .await
        .unwrap();
    let kv = b.create("/e/a", b"v".to_vec()).await.unwrap();
    assert_eq!(b.get("/e/a").await.unwrap(), Some(kv));
    assert!(!dir.path().join("server/db/state.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_history_is_compacted_too() {
    let Some((b, _guard)) = common::etcd().await else {
        return;
    };
    let mut rev = b.create("/ec/a", vec![0]).await.unwrap().mod_revision;
    for i in 0..200u8 {
        rev = b.update("/ec/a", rev, vec![i]).await.unwrap().mod_revision;
    }
    let mut c = Compactor::new(CompactionPolicy {
        interval: Duration::from_millis(10),
        retain: Duration::ZERO,
        keep_revisions: 0,
    });
    assert_eq!(c.pass(b.as_ref()).await.unwrap(), Some(rev));
    let err = b
        .list(
            "/ec/",
            evoke_store::ListOptions {
                revision: Some(rev - 100),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
}

fn quick_policy() -> CompactionPolicy {
    CompactionPolicy {
        interval: Duration::from_millis(50),
        retain: Duration::ZERO,
        keep_revisions: 10,
    }
}

/// Waits until `b` has compacted to `want`.
async fn wait_compacted(b: &dyn Backend, want: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let c = b.compacted_revision().await.unwrap();
        if c == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "background compaction reached {c}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compacts_its_history_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let b = SqliteBackend::open_with(dir.path().join("state.db"), Some(quick_policy())).unwrap();
    let mut rev = b.create("/bg/a", vec![0]).await.unwrap().mod_revision;
    for i in 0..200u8 {
        rev = b.update("/bg/a", rev, vec![i]).await.unwrap().mod_revision;
    }
    wait_compacted(&b, rev - 10).await;
    // Ten newer revisions plus the value as of the compaction point.
    assert_eq!(b.log_rows().await.unwrap(), 11);
    assert_eq!(b.get("/bg/a").await.unwrap().unwrap().value, vec![199]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compacts_its_history_in_the_background() {
    if !common::etcd_available() {
        return;
    }
    let server = evoke_store::etcd::LocalEtcd::start(None).await.unwrap();
    let b = evoke_store::EtcdBackend::connect_with(server.endpoint(), "/bg", Some(quick_policy()))
        .await
        .unwrap();
    let mut rev = b.create("/bg/a", vec![0]).await.unwrap().mod_revision;
    for i in 0..100u8 {
        rev = b.update("/bg/a", rev, vec![i]).await.unwrap().mod_revision;
    }
    // The compactor's own bookkeeping write may land first; wait for any
    // point at or past ten behind the last update.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while b.compacted_revision().await.unwrap() < rev - 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "etcd compacted in time"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let err = b
        .list(
            "/bg/",
            evoke_store::ListOptions {
                revision: Some(rev - 50),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
}
