//! Differential test: a long random sequence of operations runs against the
//! in-memory reference and the SQLite backend, and every answer must be the
//! same (values, revisions, errors, historical lists and watch replays).
#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

mod common;

use std::sync::Arc;
use std::time::Duration;

use evoke_store::{Backend, Event, ListOptions, StoreError};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Errors compared by kind and content, as Debug strings.
fn outcome<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {e:?}"),
    }
}

async fn replay(
    b: &dyn Backend,
    prefix: &str,
    after: i64,
    head: i64,
) -> Result<Vec<Event>, String> {
    let mut w = match b.watch(prefix, after).await {
        Ok(w) => w,
        Err(e) => return Err(format!("{e:?}")),
    };
    // The caller's last write (revision `head`) is under `prefix`, so the
    // replay ends with it.
    let mut out = Vec::new();
    while out.last().map(Event::revision).unwrap_or(after) < head {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(ev))) => out.push(ev),
            Ok(Some(Err(e))) => return Err(format!("{e:?}")),
            Ok(None) => return Err("ended".into()),
            Err(_) => return Err(format!("no event up to {head} within 10 s")),
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_answers_exactly_as_the_reference_over_random_operations() {
    let (sqlite, _guard) = common::sqlite().await.unwrap();
    differential(sqlite, 1500, true).await;
}

/// etcd's compaction writes its bookkeeping key (a revision of its own),
/// so this run leaves compaction out to keep revisions comparable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_answers_exactly_as_the_reference_over_random_operations() {
    let Some((etcd, _guard)) = common::etcd().await else {
        return;
    };
    differential(etcd, 600, false).await;
}

async fn differential(sqlite: Arc<dyn Backend>, steps: usize, compaction: bool) {
    let reference: Arc<dyn Backend> = Arc::new(evoke_store::MemoryBackend::new());
    // etcd starts at revision 1: bring the reference level, with a key
    // outside every prefix the operations use.
    let start = sqlite.revision().await.unwrap();
    for i in 0..start {
        reference.create(&format!("pad{i}"), vec![]).await.unwrap();
    }
    let mut rng = StdRng::seed_from_u64(0x5eed_0fe7);
    let keys: Vec<String> = (0..12)
        .map(|i| format!("/{}/k{i}", ["a", "b", "ab"][i % 3]))
        .collect();
    let (mut oks, mut errs) = (0, 0);
    for step in 0..steps {
        let key = &keys[rng.random_range(0..keys.len())];
        let current = reference.get(key).await.unwrap().map(|kv| kv.mod_revision);
        // Mostly right revisions, sometimes stale or made up ones.
        let expected = match (current, rng.random_range(0..4)) {
            (Some(r), 0..=2) => r,
            (Some(r), _) => r - 1,
            (None, _) => rng.random_range(1..50),
        };
        let value = vec![rng.random::<u8>(); rng.random_range(0..64)];
        let (a, b) = match rng.random_range(0..100) {
            0..=29 => (
                outcome(reference.create(key, value.clone()).await),
                outcome(sqlite.create(key, value).await),
            ),
            30..=64 => (
                outcome(reference.update(key, expected, value.clone()).await),
                outcome(sqlite.update(key, expected, value).await),
            ),
            65..=79 => {
                let exp = rng.random_bool(0.5).then_some(expected);
                (
                    outcome(reference.delete(key, exp).await),
                    outcome(sqlite.delete(key, exp).await),
                )
            }
            80..=89 => {
                let head = reference.revision().await.unwrap();
                let low = reference.compacted_revision().await.unwrap();
                let opts = ListOptions {
                    revision: rng
                        .random_bool(0.5)
                        .then(|| rng.random_range(low..=head + 1)),
                    limit: rng.random_bool(0.5).then(|| rng.random_range(0..5)),
                    start_after: rng.random_bool(0.3).then(|| key.clone()),
                };
                let prefix = ["/", "/a", "/a/", "/b/", "/ab/", "/zz"][rng.random_range(0..6)];
                (
                    outcome(reference.list(prefix, opts.clone()).await),
                    outcome(sqlite.list(prefix, opts).await),
                )
            }
            90..=96 => {
                let before = reference.revision().await.unwrap();
                let after = rng.random_range(0..=before);
                let prefix = ["/", "/a/", "/b"][rng.random_range(0..3)];
                // A last write under the prefix marks where the replay ends.
                let mark = format!("{prefix}mark{step}");
                let head = reference.create(&mark, vec![]).await.unwrap().mod_revision;
                assert_eq!(
                    sqlite.create(&mark, vec![]).await.unwrap().mod_revision,
                    head
                );
                (
                    format!(
                        "{:?}",
                        replay(reference.as_ref(), prefix, after, head).await
                    ),
                    format!("{:?}", replay(sqlite.as_ref(), prefix, after, head).await),
                )
            }
            _ if !compaction => continue,
            _ => {
                let head = reference.revision().await.unwrap();
                let to = rng.random_range(0..=head);
                (
                    outcome(reference.compact(to).await),
                    outcome(sqlite.compact(to).await),
                )
            }
        };
        assert_eq!(a, b, "step {step}: reference vs backend");
        if a.starts_with("ok") || a.starts_with("Ok") {
            oks += 1;
        } else {
            errs += 1;
        }
        assert_eq!(
            reference.revision().await.unwrap(),
            sqlite.revision().await.unwrap(),
            "step {step}: revisions"
        );
    }
    // The sequence exercised both paths, not just one.
    assert!(
        oks > steps / 3 && errs > steps / 15,
        "{oks} successes, {errs} errors"
    );
}
