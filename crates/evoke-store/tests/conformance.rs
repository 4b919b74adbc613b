//! One behaviour suite for every backend. Each behaviour is a generic async
//! fn over `Arc<dyn Backend>`; the `backend_suite!` macro instantiates all of
//! them for one backend constructor. Read a behaviour's name as its spec.

#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

mod common;

use std::sync::Arc;
use std::time::Duration;

use evoke_store::{Backend, Event, ListOptions, StoreError, WatchStream};
use futures::StreamExt;

const STEP: Duration = Duration::from_secs(10);

async fn next_event(w: &mut WatchStream) -> Event {
    tokio::time::timeout(STEP, w.next())
        .await
        .expect("watch event within 10 s")
        .expect("watch stream still open")
        .expect("watch event, not an error")
}

async fn no_event_for(w: &mut WatchStream, d: Duration) {
    if let Ok(ev) = tokio::time::timeout(d, w.next()).await {
        panic!("unexpected watch item: {ev:?}");
    }
}

pub async fn create_then_get_returns_value_and_revisions(b: Arc<dyn Backend>) {
    let r0 = b.revision().await.expect("revision");
    let kv = b.create("/a/x", b"one".to_vec()).await.expect("create");
    assert_eq!(kv.key, "/a/x");
    assert_eq!(kv.value, b"one");
    assert!(kv.mod_revision > r0);
    assert_eq!(kv.create_revision, kv.mod_revision);
    assert_eq!(b.get("/a/x").await.expect("get"), Some(kv.clone()));
    assert_eq!(b.revision().await.expect("revision"), kv.mod_revision);
    assert_eq!(b.get("/a/missing").await.expect("get"), None);
}

pub async fn create_of_existing_key_fails_with_already_exists(b: Arc<dyn Backend>) {
    b.create("/a/x", b"one".to_vec()).await.expect("create");
    let err = b.create("/a/x", b"two".to_vec()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists(ref k) if k == "/a/x"),
        "{err}"
    );
    assert_eq!(
        b.get("/a/x").await.expect("get").expect("kept").value,
        b"one"
    );
}

pub async fn empty_key_is_rejected(b: Arc<dyn Backend>) {
    let err = b.create("", b"v".to_vec()).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey(_)), "{err}");
}

pub async fn update_with_current_revision_succeeds_and_keeps_create_revision(b: Arc<dyn Backend>) {
    let c = b.create("/a/x", b"one".to_vec()).await.expect("create");
    let u = b
        .update("/a/x", c.mod_revision, b"two".to_vec())
        .await
        .expect("update");
    assert!(u.mod_revision > c.mod_revision);
    assert_eq!(u.create_revision, c.create_revision);
    assert_eq!(b.get("/a/x").await.expect("get"), Some(u));
}

pub async fn update_with_stale_revision_fails_with_conflict(b: Arc<dyn Backend>) {
    let c = b.create("/a/x", b"one".to_vec()).await.expect("create");
    let u = b
        .update("/a/x", c.mod_revision, b"two".to_vec())
        .await
        .expect("update");
    let err = b
        .update("/a/x", c.mod_revision, b"three".to_vec())
        .await
        .unwrap_err();
    match err {
        StoreError::Conflict {
            key,
            expected,
            actual,
        } => {
            assert_eq!(key, "/a/x");
            assert_eq!(expected, c.mod_revision);
            assert_eq!(actual, u.mod_revision);
        }
        other => panic!("expected conflict, got {other}"),
    }
    assert_eq!(
        b.get("/a/x").await.expect("get").expect("kept").value,
        b"two"
    );
}

pub async fn update_of_missing_key_fails_with_not_found(b: Arc<dyn Backend>) {
    let err = b.update("/a/none", 1, b"v".to_vec()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(ref k) if k == "/a/none"),
        "{err}"
    );
}

pub async fn delete_honours_expected_revision_and_returns_last_value(b: Arc<dyn Backend>) {
    let c = b.create("/a/x", b"one".to_vec()).await.expect("create");
    let err = b
        .delete("/a/x", Some(c.mod_revision + 100))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let gone = b
        .delete("/a/x", Some(c.mod_revision))
        .await
        .expect("delete");
    assert_eq!(gone, c);
    assert_eq!(b.get("/a/x").await.expect("get"), None);
    let err = b.delete("/a/x", None).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    // The delete itself took a revision.
    assert!(b.revision().await.expect("revision") > c.mod_revision);
    // A key can be created again after a delete, with a new create_revision.
    let again = b.create("/a/x", b"two".to_vec()).await.expect("recreate");
    assert!(again.create_revision > c.create_revision);
}

pub async fn unconditional_delete_removes_key(b: Arc<dyn Backend>) {
    b.create("/a/x", b"one".to_vec()).await.expect("create");
    b.delete("/a/x", None).await.expect("delete");
    assert_eq!(b.get("/a/x").await.expect("get"), None);
}

pub async fn list_returns_keys_under_prefix_in_order_with_pagination(b: Arc<dyn Backend>) {
    for k in ["/p/c", "/p/a", "/q/a", "/p/b", "/pz", "/p/d"] {
        b.create(k, k.as_bytes().to_vec()).await.expect("create");
    }
    let all = b.list("/p/", ListOptions::default()).await.expect("list");
    let keys: Vec<_> = all.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b", "/p/c", "/p/d"]);
    assert!(!all.more);
    assert_eq!(all.revision, b.revision().await.expect("revision"));

    let page1 = b
        .list(
            "/p/",
            ListOptions {
                limit: Some(3),
                ..Default::default()
            },
        )
        .await
        .expect("page 1");
    assert_eq!(page1.items.len(), 3);
    assert!(page1.more);
    let page2 = b
        .list(
            "/p/",
            ListOptions {
                limit: Some(3),
                start_after: Some(page1.items[2].key.clone()),
                revision: Some(page1.revision),
            },
        )
        .await
        .expect("page 2");
    let keys: Vec<_> = page2.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/d"]);
    assert!(!page2.more);
    assert_eq!(page2.revision, page1.revision);

    let exact = b
        .list(
            "/p/",
            ListOptions {
                limit: Some(4),
                ..Default::default()
            },
        )
        .await
        .expect("exact page");
    assert_eq!(exact.items.len(), 4);
    assert!(!exact.more, "no more keys follow the last one");
}

pub async fn list_at_an_old_revision_sees_the_old_state(b: Arc<dyn Backend>) {
    let a = b.create("/o/a", b"a1".to_vec()).await.expect("create a");
    let bb = b.create("/o/b", b"b1".to_vec()).await.expect("create b");
    let at = bb.mod_revision;
    b.update("/o/a", a.mod_revision, b"a2".to_vec())
        .await
        .expect("update a");
    b.delete("/o/b", None).await.expect("delete b");
    b.create("/o/c", b"c1".to_vec()).await.expect("create c");

    let old = b
        .list(
            "/o/",
            ListOptions {
                revision: Some(at),
                ..Default::default()
            },
        )
        .await
        .expect("old list");
    assert_eq!(old.revision, at);
    assert_eq!(old.items, vec![a, bb]);

    let now = b.list("/o/", ListOptions::default()).await.expect("list");
    let vals: Vec<_> = now.items.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(vals, [b"a2".to_vec(), b"c1".to_vec()]);
}

pub async fn list_at_a_future_revision_fails(b: Arc<dyn Backend>) {
    b.create("/f/a", b"a".to_vec()).await.expect("create");
    let rev = b.revision().await.expect("revision");
    let err = b
        .list(
            "/f/",
            ListOptions {
                revision: Some(rev + 10),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::FutureRevision(_)), "{err}");
}

pub async fn watch_replays_history_then_delivers_live_events_in_order(b: Arc<dyn Backend>) {
    let start = b.revision().await.expect("revision");
    let c = b.create("/w/a", b"1".to_vec()).await.expect("create");
    let u = b
        .update("/w/a", c.mod_revision, b"2".to_vec())
        .await
        .expect("update");
    let mut w = b.watch("/w/", start).await.expect("watch");
    assert_eq!(
        next_event(&mut w).await,
        Event::Put {
            kv: c.clone(),
            prev: None
        }
    );
    assert_eq!(
        next_event(&mut w).await,
        Event::Put {
            kv: u.clone(),
            prev: Some(c.clone())
        }
    );
    let d = b.delete("/w/a", None).await.expect("delete");
    match next_event(&mut w).await {
        Event::Delete { prev, revision } => {
            assert_eq!(prev, d);
            assert!(revision > u.mod_revision);
        }
        other => panic!("expected delete, got {other:?}"),
    }
    let c2 = b.create("/w/b", b"x".to_vec()).await.expect("create b");
    assert_eq!(next_event(&mut w).await, Event::Put { kv: c2, prev: None });
}

pub async fn watch_from_now_sees_only_later_changes_under_its_prefix(b: Arc<dyn Backend>) {
    b.create("/w/old", b"o".to_vec()).await.expect("create");
    let now = b.revision().await.expect("revision");
    let mut w = b.watch("/w/", now).await.expect("watch");
    b.create("/other/x", b"x".to_vec())
        .await
        .expect("create other");
    b.create("/wx", b"x".to_vec())
        .await
        .expect("create sibling");
    let kv = b.create("/w/new", b"n".to_vec()).await.expect("create new");
    assert_eq!(next_event(&mut w).await, Event::Put { kv, prev: None });
    no_event_for(&mut w, Duration::from_millis(300)).await;
}

pub async fn many_watchers_each_see_every_event_in_revision_order(b: Arc<dyn Backend>) {
    let now = b.revision().await.expect("revision");
    let mut ws = Vec::new();
    for _ in 0..10 {
        ws.push(b.watch("/m/", now).await.expect("watch"));
    }
    let mut kvs = Vec::new();
    for i in 0..50 {
        kvs.push(
            b.create(&format!("/m/{i:03}"), vec![i as u8])
                .await
                .expect("create"),
        );
    }
    for w in &mut ws {
        for kv in &kvs {
            assert_eq!(
                next_event(w).await,
                Event::Put {
                    kv: kv.clone(),
                    prev: None
                }
            );
        }
    }
}

pub async fn concurrent_writers_get_distinct_increasing_revisions(b: Arc<dyn Backend>) {
    let mut tasks = Vec::new();
    for i in 0..64 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.create(&format!("/c/{i}"), vec![1]).await.expect("create")
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.expect("task").mod_revision);
    }
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 64, "every write got its own revision");
    let list = b.list("/c/", ListOptions::default()).await.expect("list");
    assert_eq!(list.items.len(), 64);
}

pub async fn racing_updates_with_the_same_expected_revision_let_exactly_one_win(
    b: Arc<dyn Backend>,
) {
    let c = b.create("/r/x", b"0".to_vec()).await.expect("create");
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let b = b.clone();
        let rev = c.mod_revision;
        tasks.push(tokio::spawn(
            async move { b.update("/r/x", rev, vec![i]).await },
        ));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => wins += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1);
}

pub async fn compaction_keeps_current_values_and_refuses_older_reads(b: Arc<dyn Backend>) {
    let c = b.create("/k/a", b"1".to_vec()).await.expect("create");
    let mut last = c.clone();
    for i in 0..20u8 {
        last = b
            .update("/k/a", last.mod_revision, vec![i])
            .await
            .expect("update");
    }
    let gone = b.create("/k/gone", b"g".to_vec()).await.expect("create");
    b.delete("/k/gone", None).await.expect("delete");
    let keep = b.create("/k/b", b"b".to_vec()).await.expect("create b");
    let at = b.revision().await.expect("revision");
    b.compact(at).await.expect("compact");
    assert!(b.compacted_revision().await.expect("compacted") >= at);

    // Current values survive, with their revisions.
    assert_eq!(b.get("/k/a").await.expect("get"), Some(last.clone()));
    let now = b.list("/k/", ListOptions::default()).await.expect("list");
    assert_eq!(now.items, vec![last.clone(), keep.clone()]);
    // Reading at the compacted revision works; older fails with Compacted.
    let at_c = b
        .list(
            "/k/",
            ListOptions {
                revision: Some(at),
                ..Default::default()
            },
        )
        .await
        .expect("list at compacted revision");
    assert_eq!(at_c.items.len(), 2);
    let err = b
        .list(
            "/k/",
            ListOptions {
                revision: Some(gone.mod_revision),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");

    // A watch from before the compaction fails with Compacted, either at
    // once or as its first item.
    match b.watch("/k/", c.mod_revision).await {
        Err(StoreError::Compacted { .. }) => {}
        Err(e) => panic!("expected compacted, got {e}"),
        Ok(mut w) => {
            let item = tokio::time::timeout(STEP, w.next())
                .await
                .expect("item in time")
                .expect("an item");
            assert!(
                matches!(item, Err(StoreError::Compacted { .. })),
                "{item:?}"
            );
        }
    }
    // A watch from the compacted revision sees later changes, with prev.
    let mut w = b
        .watch("/k/", b.compacted_revision().await.expect("compacted"))
        .await
        .expect("watch");
    let u = b
        .update("/k/a", last.mod_revision, b"new".to_vec())
        .await
        .expect("update after compaction");
    assert_eq!(
        next_event(&mut w).await,
        Event::Put {
            kv: u,
            prev: Some(last)
        }
    );
}

pub async fn compacting_twice_or_backwards_is_harmless(b: Arc<dyn Backend>) {
    b.create("/h/a", b"1".to_vec()).await.expect("create");
    let r = b.revision().await.expect("revision");
    b.compact(r).await.expect("compact");
    b.compact(r).await.expect("compact again");
    b.compact(1).await.expect("compact backwards");
    assert!(b.compacted_revision().await.expect("compacted") >= r);
    let err = b.compact(r + 1000).await.unwrap_err();
    assert!(matches!(err, StoreError::FutureRevision(_)), "{err}");
}

pub async fn a_lagging_watcher_catches_up_from_history(b: Arc<dyn Backend>) {
    let now = b.revision().await.expect("revision");
    let mut w = b.watch("/lag/", now).await.expect("watch");
    // More writes than the live buffer holds, while the watcher is idle.
    let n = 3000;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 8 {
                b.create(&format!("/lag/{t}-{i}"), vec![0])
                    .await
                    .expect("create");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let mut last = now;
    for _ in 0..n {
        let ev = next_event(&mut w).await;
        assert!(ev.revision() > last, "revisions increase");
        last = ev.revision();
    }
    no_event_for(&mut w, Duration::from_millis(200)).await;
}

pub async fn list_of_more_than_four_mib_returns_everything_in_pages_or_whole(b: Arc<dyn Backend>) {
    let n = 1200;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(16) {
                b.create(&format!("/big/{i:05}"), vec![b'x'; 4096])
                    .await
                    .expect("create");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let all = b
        .list("/big/", ListOptions::default())
        .await
        .expect("list all");
    assert_eq!(all.items.len(), n);
    assert!(!all.more);
    let first = b
        .list(
            "/big/",
            ListOptions {
                limit: Some(700),
                ..Default::default()
            },
        )
        .await
        .expect("first page");
    assert_eq!(first.items.len(), 700);
    assert!(first.more);
    let rest = b
        .list(
            "/big/",
            ListOptions {
                start_after: first.items.last().map(|kv| kv.key.clone()),
                revision: Some(first.revision),
                limit: Some(700),
            },
        )
        .await
        .expect("second page");
    assert_eq!(rest.items.len(), n - 700);
    assert!(!rest.more);
    assert_eq!(rest.items[0].key, "/big/00700");
}

macro_rules! backend_suite {
    ($setup:path) => {
        backend_suite!(@tests $setup;
            create_then_get_returns_value_and_revisions,
            create_of_existing_key_fails_with_already_exists,
            empty_key_is_rejected,
            update_with_current_revision_succeeds_and_keeps_create_revision,
            update_with_stale_revision_fails_with_conflict,
            update_of_missing_key_fails_with_not_found,
            delete_honours_expected_revision_and_returns_last_value,
            unconditional_delete_removes_key,
            list_returns_keys_under_prefix_in_order_with_pagination,
            list_at_an_old_revision_sees_the_old_state,
            list_at_a_future_revision_fails,
            watch_replays_history_then_delivers_live_events_in_order,
            watch_from_now_sees_only_later_changes_under_its_prefix,
            many_watchers_each_see_every_event_in_revision_order,
            concurrent_writers_get_distinct_increasing_revisions,
            racing_updates_with_the_same_expected_revision_let_exactly_one_win,
            compaction_keeps_current_values_and_refuses_older_reads,
            compacting_twice_or_backwards_is_harmless,
            a_lagging_watcher_catches_up_from_history,
            list_of_more_than_four_mib_returns_everything_in_pages_or_whole,
        );
    };
    (@tests $setup:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some((backend, _guard)) = $setup().await else { return };
                super::$name(backend).await;
            }
        )*
    };
}

mod memory {
    backend_suite!(crate::common::memory);
}

mod sqlite {
    backend_suite!(crate::common::sqlite);
}

mod etcd {
    backend_suite!(crate::common::etcd);
}
