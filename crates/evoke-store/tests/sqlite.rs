//! SQLite-specific behaviour beyond the shared conformance suite.
#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

use evoke_store::SqliteBackend;

#[tokio::test]
async fn a_second_open_of_the_same_sqlite_store_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let first = SqliteBackend::open(&db).unwrap();
    let err = SqliteBackend::open(&db).err().expect("second open refused");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(first);
    SqliteBackend::open(&db).expect("reopen after close");
}
