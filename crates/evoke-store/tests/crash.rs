//! Crash safety of the SQLite backend: a child process writes as fast as it
//! can and prints every write the store acknowledged; the parent kills it
//! with SIGKILL mid-burst, reopens the file and checks that every
//! acknowledged write is there and the database is consistent.
//!
//! The child is this test binary again, run with `EVOKE_STORE_BURST_DB` set
//! (see `write_burst`).
#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evoke_store::{Backend, SqliteBackend};

const CHILD_ENV: &str = "EVOKE_STORE_BURST_DB";
const WRITERS: usize = 8;

/// Writes until stopped: each writer creates keys `/burst/{w}/{i}` and
/// moves its counter `/counter/{w}` to `i`. Prints `ACK create KEY REV` and
/// `ACK counter W I` after each acknowledged write.
async fn burst(db: &Path, limit: Option<usize>) {
    let b = Arc::new(SqliteBackend::open(db).unwrap());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let counter = format!("/counter/{w}");
            let mut crev = b
                .create(&counter, b"0".to_vec())
                .await
                .unwrap()
                .mod_revision;
            let mut i = 0;
            while limit.is_none_or(|l| i < l) {
                i += 1;
                let key = format!("/burst/{w}/{i}");
                let kv = b.create(&key, key.as_bytes().to_vec()).await.unwrap();
                say(&format!("ACK create {key} {}", kv.mod_revision));
                crev = b
                    .update(&counter, crev, i.to_string().into_bytes())
                    .await
                    .unwrap()
                    .mod_revision;
                say(&format!("ACK counter {w} {i}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Acknowledged writes parsed from the child's output.
#[derive(Default)]
struct Acks {
    created: HashMap<String, i64>,
    counters: HashMap<usize, usize>,
    max_revision: i64,
}

impl Acks {
    fn take(&mut self, line: &str) {
        let parts: Vec<_> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["ACK", "create", key, rev] => {
                let rev: i64 = rev.parse().unwrap();
                self.max_revision = self.max_revision.max(rev);
                self.created.insert((*key).to_owned(), rev);
            }
            ["ACK", "counter", w, i] => {
                let e = self.counters.entry(w.parse().unwrap()).or_default();
                *e = (*e).max(i.parse().unwrap());
            }
            _ => {}
        }
    }
}

async fn check(db: &Path, acks: &Acks) {
    let b = SqliteBackend::open(db).unwrap();
    b.check_integrity().await.unwrap();
    assert!(b.revision().await.unwrap() >= acks.max_revision);
    for (key, rev) in &acks.created {
        let kv = b
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged create of {key} at {rev} was lost"));
        assert_eq!(kv.mod_revision, *rev, "{key}");
        assert_eq!(kv.value, key.as_bytes(), "{key}");
    }
    for (w, i) in &acks.counters {
        let kv = b.get(&format!("/counter/{w}")).await.unwrap().unwrap();
        let stored: usize = String::from_utf8(kv.value).unwrap().parse().unwrap();
        assert!(
            stored >= *i,
            "counter {w}: acknowledged {i}, stored {stored}"
        );
    }
    // The reopened store takes new writes after the old revisions.
    let kv = b.create("/after-crash", vec![1]).await.unwrap();
    assert!(kv.mod_revision > acks.max_revision);
}

/// The child's entry point when run with CHILD_ENV; otherwise a short,
/// clean burst in-process, checked the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_burst() {
    if let Ok(db) = std::env::var(CHILD_ENV) {
        burst(Path::new(&db), None).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    burst(&db, Some(20)).await;
    let mut acks = Acks::default();
    for w in 0..WRITERS {
        for i in 1..=20 {
            let key = format!("/burst/{w}/{i}");
            let rev = SqliteBackend::open(&db)
                .unwrap()
                .get(&key)
                .await
                .unwrap()
                .unwrap()
                .mod_revision;
            acks.take(&format!("ACK create {key} {rev}"));
        }
        acks.take(&format!("ACK counter {w} 20"));
    }
    check(&db, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let mut total = Acks::default();
    // Several crashes in a row on the same file, each mid-burst.
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "write_burst", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut acks = 0;
        let started = Instant::now();
        // Kill after a few hundred acknowledged writes (or 20 s at most).
        while acks < 300 + round * 100 && started.elapsed() < Duration::from_secs(20) {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                if line.starts_with("ACK") {
                    acks += 1;
                }
                total.take(&line);
            }
        }
        assert!(acks > 0, "child acknowledged writes before the kill");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines printed before the kill are still in the pipe: take them all.
        for line in rx.iter() {
            total.take(&line);
        }
        reader.join().unwrap();
        check(&db, &total).await;
        eprintln!(
            "round {round}: {} creates acknowledged so far, all present",
            total.created.len()
        );
        // Remove the marker key so the next round's check can create it.
        let b = SqliteBackend::open(&db).unwrap();
        b.delete("/after-crash", None).await.unwrap();
        // The next child creates its counters again: clear them.
        for w in 0..WRITERS {
            b.delete(&format!("/counter/{w}"), None).await.unwrap();
        }
        total.counters.clear();
        total.max_revision = b.revision().await.unwrap();
        // Each child starts its keys at 1 again: keep their keys apart.
        let list = b.list("/burst/", Default::default()).await.unwrap();
        for kv in list.items {
            b.delete(&kv.key, None).await.unwrap();
        }
        total.created.clear();
    }
}
