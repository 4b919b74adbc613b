//! The embedded default backend: one SQLite file in WAL mode.
//!
//! Layout: `log` holds every revision (the value written, or a tombstone for
//! a delete, with the revision it replaced); `current` maps each live key to
//! its latest log row; `meta` holds the global revision and the compaction
//! point. All writes go through one writer thread, which takes every request
//! waiting in its queue and commits them in one transaction with one fsync
//! (group commit): under concurrent load that is many writes per fsync, yet
//! no write is acknowledged before its commit is durable (synchronous=FULL).
//! Reads use a small pool of read connections on the blocking thread pool;
//! WAL gives each read transaction a consistent snapshot.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{broadcast, oneshot};

use crate::compactor::Compactor;
use crate::watch::{self, History};
use crate::{
    Backend, CompactionPolicy, Event, KeyValue, ListOptions, ListResult, StoreError, WatchStream,
};

/// At most this many writes share one transaction.
const MAX_BATCH: usize = 512;

/// Read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;

/// WAL frames after which the writer checkpoints by itself. SQLite's own
/// default (1000) runs the checkpoint inside the commit that crosses it, so
/// that commit's callers and watchers wait for a copy of the WAL into the
/// database and its fsync; the [`Checkpointer`] thread normally does that
/// work beside the writer. Under a steady stream of commits the WAL can only
/// start over once a checkpoint has caught up with no commit in between,
/// which the writer's own pass guarantees. At 2,000 frames (8 MiB) one large
/// transaction (a compaction deleting thousands of rows) that crosses the
/// mark still leaves the WAL well under 20 MiB, and the pass is short because
/// the thread has already copied most frames.
const WRITER_AUTOCHECKPOINT: i64 = 2_000;

/// Least time between two checkpoints of the [`Checkpointer`] thread, so a
/// stream of commits does not turn into a checkpoint (two fsyncs) each.
const CHECKPOINT_SPACING: std::time::Duration = std::time::Duration::from_millis(200);

/// Attempts (5 ms apart) at the checkpoint that ends a compaction.
const COMPACT_CHECKPOINT_TRIES: usize = 200;

/// Page cache of the writer connection, as SQLite's `cache_size` (negative:
/// KiB).
const WRITER_CACHE_KIB: i64 = -1024;

/// Page cache of each read connection: reads are short transactions over a
/// few pages, and every pooled connection keeps its cache while idle.
const READER_CACHE_KIB: i64 = -512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    revision        INTEGER PRIMARY KEY,
    key             BLOB NOT NULL,
    value           BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision   INTEGER,
    deleted         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS log_key_revision ON log(key, revision);
CREATE TABLE IF NOT EXISTS current (
    key      BLOB PRIMARY KEY,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
";

fn sql_err(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("sqlite {}: {e}", path.display()))
}

/// The `[lo, hi)` byte range of keys under `prefix`; `hi` is None when
/// the range is unbounded above.
fn prefix_range(prefix: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    let lo = prefix.as_bytes().to_vec();
    let mut hi = lo.clone();
    while let Some(last) = hi.pop() {
        if last < 0xff {
            hi.push(last + 1);
            return (lo, Some(hi));
        }
    }
    (lo, None)
}

fn key_string(path: &Path, bytes: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|e| {
        StoreError::Backend(format!(
            "sqlite {}: stored key is not utf-8: {e}",
            path.display()
        ))
    })
}

/// One write waiting for the writer thread.
enum Op {
    Create {
        key: String,
        value: Vec<u8>,
    },
    Update {
        key: String,
        expected: i64,
        value: Vec<u8>,
    },
    Delete {
        key: String,
        expected: Option<i64>,
    },
}

enum Request {
    Write(Op, oneshot::Sender<Result<Event, StoreError>>),
    Compact(i64, oneshot::Sender<Result<(), StoreError>>),
}

/// Revision counters readable without a query.
struct Counters {
    revision: AtomicI64,
    compacted: AtomicI64,
}

/// The SQLite [`Backend`]. Dropping it stops the writer after it has
/// finished the requests already queued.
pub struct SqliteBackend {
    path: PathBuf,
    /// Exclusive lock on `<path>.lock`: one process owns the store, since
    /// the revision counter and the watch broadcast live in that process.
    _lock: nix::fcntl::Flock<std::fs::File>,
    writer: Mutex<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Arc<Checkpointer>,
    readers: Arc<ReadPool>,
    counters: Arc<Counters>,
    tx: broadcast::Sender<Arc<Event>>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Writers wait for each other instead of failing with SQLITE_BUSY (only
    // the compactor's checkpoint and a second process could contend).
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // WAL: readers never block the writer. synchronous=FULL: a commit is on
    // disk before it returns, so an acknowledged write survives kill -9 and
    // power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // After a checkpoint the WAL is rewritten from its start rather than
    // truncated: overwriting allocated blocks makes each commit's fsync
    // cheaper than growing the file (about 2 ms instead of 6 ms here). It is
    // cut back to this size if a long reader made it grow.
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    // The writer mostly appends log rows it never reads again; a cache of
    // hot index pages is all it needs (SQLite's default is 2 MiB per
    // connection). The OS page cache holds the rest of the file.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)?;
    Ok(())
}

/// Folds the WAL back into the database file on a thread of its own, after
/// commits, with a PASSIVE checkpoint: it takes no lock the writer or the
/// readers wait for, so commits (and the watch events behind them) never
/// queue behind a checkpoint's copying and fsync.
struct Checkpointer {
    /// One message per commit; closing it stops the thread.
    kick: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path).map_err(|e| sql_err(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| sql_err(path, e))?;
        let (tx, rx) = mpsc::channel::<()>();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("evoke-store-checkpoint".into())
            .spawn(move || {
                let mut pending = false;
                loop {
                    if !pending && rx.recv().is_err() {
                        return;
                    }
                    let started = Instant::now();
                    let res = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    match res {
                        Ok((frames, done)) => tracing::trace!(
                            frames, done, took = ?started.elapsed(), "sqlite checkpoint"
                        ),
                        Err(e) => {
                            tracing::debug!(path = %path.display(), error = %e, "sqlite checkpoint")
                        }
                    }
                    // Commits until the next pass may start are folded into it.
                    pending = false;
                    let next = started + CHECKPOINT_SPACING;
                    loop {
                        match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                            Ok(()) => pending = true,
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Backend(format!("spawn sqlite checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            kick: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for a checkpoint soon.
    fn kick(&self) {
        if let Some(tx) = self.kick.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(());
        }
    }

    /// Stops the thread and closes its connection.
    fn stop(&self) {
        self.kick.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`, and starts its
    /// writer thread, which also compacts history by the default
    /// [`CompactionPolicy`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, Some(CompactionPolicy::default()))
    }

    /// As [`open`](Self::open), with the given compaction policy (None: only
    /// explicit [`Backend::compact`] calls compact).
    pub fn open_with(
        path: impl AsRef<Path>,
        compaction: Option<CompactionPolicy>,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("create directory {}: {e}", dir.display()))
            })?;
        }
        let lock = lock_file(&path)?;
        let conn = Connection::open(&path).map_err(|e| sql_err(&path, e))?;
        // Must precede table creation to take effect on a new file: freed
        // pages are tracked so compaction can hand them back to the OS.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(|e| sql_err(&path, e))?;
        configure(&conn).map_err(|e| sql_err(&path, e))?;
        conn.execute_batch(SCHEMA).map_err(|e| sql_err(&path, e))?;
        let (revision, compacted) = read_meta(&conn).map_err(|e| sql_err(&path, e))?;
        tracing::info!(path = %path.display(), revision, compacted, "opened sqlite store");

        let counters = Arc::new(Counters {
            revision: AtomicI64::new(revision),
            compacted: AtomicI64::new(compacted),
        });
        let (tx, _) = broadcast::channel(watch::LIVE_BUFFER);
        let (req_tx, req_rx) = mpsc::channel();
        let checkpointer = Arc::new(Checkpointer::start(&path)?);
        let mut writer = Writer {
            path: path.clone(),
            conn,
            revision,
            counters: counters.clone(),
            tx: tx.clone(),
            compactor: compaction.map(Compactor::new),
            checkpointer: checkpointer.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("evoke-store-writer".into())
            .spawn(move || writer.run(req_rx))
            .map_err(|e| StoreError::Backend(format!("spawn sqlite writer thread: {e}")))?;
        Ok(Self {
            readers: Arc::new(ReadPool {
                path: path.clone(),
                idle: Mutex::new(Vec::new()),
            }),
            path,
            _lock: lock,
            writer: Mutex::new(Some(req_tx)),
            thread: Mutex::new(Some(thread)),
            checkpointer,
            counters,
            tx,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: Op) -> Result<Event, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Write(op, tx))?;
        rx.await
            .map_err(|_| StoreError::Backend("sqlite writer thread stopped".into()))?
    }

    fn send(&self, req: Request) -> Result<(), StoreError> {
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .and_then(|w| w.send(req).ok())
            .ok_or_else(|| StoreError::Backend("sqlite writer thread stopped".into()))
    }

    /// Checks the file and the invariants between the tables: SQLite's own
    /// integrity check, every live key points at a live log row, and no log
    /// row is newer than the stored revision. Used after crashes and in tests.
    pub async fn check_integrity(&self) -> Result<(), StoreError> {
        self.readers
            .with(|conn, path| {
                let msg: String = conn
                    .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                    .map_err(|e| sql_err(path, e))?;
                if msg != "ok" {
                    return Err(StoreError::Backend(format!(
                        "sqlite {}: integrity check: {msg}",
                        path.display()
                    )));
                }
                let dangling: i64 = conn
                    .query_row(
                        "SELECT COUNT(*) FROM current c LEFT JOIN log l ON l.revision = c.revision
                         WHERE l.revision IS NULL OR l.deleted = 1 OR l.key != c.key",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(|e| sql_err(path, e))?;
                let (revision, _) = read_meta(conn).map_err(|e| sql_err(path, e))?;
                let max: i64 = conn
                    .query_row("SELECT COALESCE(MAX(revision), 0) FROM log", [], |r| {
                        r.get(0)
                    })
                    .map_err(|e| sql_err(path, e))?;
                if dangling != 0 || max > revision {
                    return Err(StoreError::Backend(format!(
                        "sqlite {}: inconsistent: {dangling} dangling keys, log at {max}, revision {revision}",
                        path.display()
                    )));
                }
                Ok(())
            })
            .await
    }

    /// Number of rows in the revision log (for tests of compaction).
    pub async fn log_rows(&self) -> Result<i64, StoreError> {
        self.readers
            .with(|conn, path| {
                conn.query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0))
                    .map_err(|e| sql_err(path, e))
            })
            .await
    }
}

impl Drop for SqliteBackend {
    fn drop(&mut self) {
        // Closing the queue lets the writer drain and exit; joining makes
        // sure the file is closed when drop returns (a reopen then works).
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        self.checkpointer.stop();
    }
}

/// Takes the store's lock file, failing at once if another process has it.
fn lock_file(db: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let path = PathBuf::from(format!("{}.lock", db.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Backend(format!("open {}: {e}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => StoreError::Backend(format!(
                "sqlite {}: in use by another process (lock {})",
                db.display(),
                path.display()
            )),
            e => StoreError::Backend(format!("lock {}: {e}", path.display())),
        },
    )
}

fn read_meta(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let revision = conn.query_row("SELECT value FROM meta WHERE name = 'revision'", [], |r| {
        r.get(0)
    })?;
    let compacted = conn.query_row("SELECT value FROM meta WHERE name = 'compacted'", [], |r| {
        r.get(0)
    })?;
    Ok((revision, compacted))
}

/// Read connections, opened on demand and reused.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    /// Runs `f` with a read connection on the blocking pool.
    async fn with<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut conn = match conn {
                Some(c) => c,
                None => {
                    let c = Connection::open(&pool.path).map_err(|e| sql_err(&pool.path, e))?;
                    c.busy_timeout(std::time::Duration::from_secs(10))
                        .map_err(|e| sql_err(&pool.path, e))?;
                    c.pragma_update(None, "cache_size", READER_CACHE_KIB)
                        .map_err(|e| sql_err(&pool.path, e))?;
                    c
                }
            };
            let out = f(&mut conn, &pool.path);
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite read task: {e}")))?
    }
}

fn row_kv(key: String, value: Vec<u8>, create_revision: i64, mod_revision: i64) -> KeyValue {
    KeyValue {
        key,
        value,
        create_revision,
        mod_revision,
    }
}

/// Reads the keys under `prefix` at `at` inside an open read transaction.
fn list_in(
    conn: &Connection,
    path: &Path,
    prefix: &str,
    opts: &ListOptions,
    at: i64,
    latest: bool,
) -> Result<ListResult, StoreError> {
    let (lo, hi) = prefix_range(prefix);
    let after = opts
        .start_after
        .as_ref()
        .map(|s| s.as_bytes().to_vec())
        .unwrap_or_default();
    // Ask for one more than the limit to learn whether more follow.
    let fetch = opts
        .limit
        .map(|l| i64::try_from(l).unwrap_or(i64::MAX - 1) + 1)
        .unwrap_or(-1);
    let sql = if latest {
        "SELECT c.key, l.value, l.create_revision, l.revision
         FROM current c JOIN log l ON l.revision = c.revision
         WHERE c.key >= ?1 AND (?2 IS NULL OR c.key < ?2) AND c.key > ?3
         ORDER BY c.key LIMIT ?4"
    } else {
        "SELECT l.key, l.value, l.create_revision, l.revision
         FROM log l
         WHERE l.key >= ?1 AND (?2 IS NULL OR l.key < ?2) AND l.key > ?3 AND l.deleted = 0
           AND l.revision = (SELECT MAX(l2.revision) FROM log l2
                             WHERE l2.key = l.key AND l2.revision <= ?5)
         ORDER BY l.key LIMIT ?4"
    };
    let mut stmt = conn.prepare_cached(sql).map_err(|e| sql_err(path, e))?;
    let (lo, hi, after) = (&lo, &hi, &after);
    let row = |r: &rusqlite::Row<'_>| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    };
    let rows = if latest {
        stmt.query_map(params![lo, hi, after, fetch], row)
    } else {
        stmt.query_map(params![lo, hi, after, fetch, at], row)
    }
    .map_err(|e| sql_err(path, e))?;
    let mut items = Vec::new();
    for row in rows {
        let (k, v, c, m) = row.map_err(|e| sql_err(path, e))?;
        items.push(row_kv(key_string(path, k)?, v, c, m));
    }
    let more = opts.limit.is_some_and(|l| items.len() > l);
    if more {
        items.pop();
    }
    Ok(ListResult {
        items,
        revision: at,
        more,
    })
}

struct SqliteHistory(Arc<ReadPool>);

#[async_trait::async_trait]
impl History for SqliteHistory {
    async fn events_after(
        &self,
        prefix: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let prefix = prefix.to_owned();
        self.0
            .with(move |conn, path| {
                let txn = conn.transaction().map_err(|e| sql_err(path, e))?;
                let (_, compacted) = read_meta(&txn).map_err(|e| sql_err(path, e))?;
                if after < compacted {
                    return Err(StoreError::Compacted {
                        requested: after,
                        compacted,
                    });
                }
                let (lo, hi) = prefix_range(&prefix);
                let mut stmt = txn
                    .prepare_cached(
                        "SELECT l.revision, l.key, l.value, l.create_revision, l.deleted,
                                p.revision, p.value, p.create_revision
                         FROM log l LEFT JOIN log p ON p.revision = l.prev_revision
                         WHERE l.revision > ?1 AND l.key >= ?2 AND (?3 IS NULL OR l.key < ?3)
                         ORDER BY l.revision LIMIT ?4",
                    )
                    .map_err(|e| sql_err(path, e))?;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = stmt
                    .query_map(params![after, lo, hi, limit], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, bool>(4)?,
                            r.get::<_, Option<i64>>(5)?,
                            r.get::<_, Option<Vec<u8>>>(6)?,
                            r.get::<_, Option<i64>>(7)?,
                        ))
                    })
                    .map_err(|e| sql_err(path, e))?;
                let mut out = Vec::new();
                for row in rows {
                    let (rev, key, value, create, deleted, prev_rev, prev_val, prev_create) =
                        row.map_err(|e| sql_err(path, e))?;
                    let key = key_string(path, key)?;
                    let prev = match (prev_rev, prev_val, prev_create) {
                        (Some(pr), Some(pv), Some(pc)) => Some(row_kv(key.clone(), pv, pc, pr)),
                        _ => None,
                    };
                    let ev = if deleted {
                        let prev = prev.ok_or_else(|| {
                            StoreError::Backend(format!(
                                "sqlite {}: delete of {key} at revision {rev} has no previous value",
                                path.display()
                            ))
                        })?;
                        Event::Delete {
                            prev,
                            revision: rev,
                        }
                    } else {
                        Event::Put {
                            kv: row_kv(key, value, create, rev),
                            prev,
                        }
                    };
                    out.push(ev);
                }
                Ok(out)
            })
            .await
    }
}

#[async_trait::async_trait]
impl Backend for SqliteBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.readers
            .with(move |conn, path| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT l.value, l.create_revision, l.revision
                         FROM current c JOIN log l ON l.revision = c.revision WHERE c.key = ?1",
                    )
                    .map_err(|e| sql_err(path, e))?;
                let row = stmt
                    .query_row([key.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
                    .map_err(|e| sql_err(path, e))?;
                Ok(row.map(|(v, c, m)| row_kv(key, v, c, m)))
            })
            .await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError> {
        let prefix = prefix.to_owned();
        self.readers
            .with(move |conn, path| {
                let txn = conn.transaction().map_err(|e| sql_err(path, e))?;
                let (revision, compacted) = read_meta(&txn).map_err(|e| sql_err(path, e))?;
                let at = opts.revision.unwrap_or(revision);
                if at > revision {
                    return Err(StoreError::FutureRevision(at));
                }
                if at < compacted {
                    return Err(StoreError::Compacted {
                        requested: at,
                        compacted,
                    });
                }
                list_in(&txn, path, &prefix, &opts, at, at == revision)
            })
            .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError> {
        crate::check_key(key)?;
        match self
            .write(Op::Create {
                key: key.to_owned(),
                value,
            })
            .await?
        {
            Event::Put { kv, .. } => Ok(kv),
            Event::Delete { .. } => Err(StoreError::Backend("create returned a delete".into())),
        }
    }

    async fn update(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError> {
        match self
            .write(Op::Update {
                key: key.to_owned(),
                expected,
                value,
            })
            .await?
        {
            Event::Put { kv, .. } => Ok(kv),
            Event::Delete { .. } => Err(StoreError::Backend("update returned a delete".into())),
        }
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue, StoreError> {
        match self
            .write(Op::Delete {
                key: key.to_owned(),
                expected,
            })
            .await?
        {
            Event::Delete { prev, .. } => Ok(prev),
            Event::Put { .. } => Err(StoreError::Backend("delete returned a put".into())),
        }
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, StoreError> {
        let rx = self.tx.subscribe();
        let compacted = self.counters.compacted.load(Ordering::SeqCst);
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        Ok(watch::stream(
            Arc::new(SqliteHistory(self.readers.clone())),
            rx,
            prefix,
            after,
        ))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.counters.revision.load(Ordering::SeqCst))
    }

    async fn compacted_revision(&self) -> Result<i64, StoreError> {
        Ok(self.counters.compacted.load(Ordering::SeqCst))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Compact(revision, tx))?;
        rx.await
            .map_err(|_| StoreError::Backend("sqlite writer thread stopped".into()))?
    }
}

/// The single writer: owns the write connection and the revision counter.
struct Writer {
    path: PathBuf,
    conn: Connection,
    /// The last committed revision.
    revision: i64,
    counters: Arc<Counters>,
    tx: broadcast::Sender<Arc<Event>>,
    /// Background compaction, run between batches on its timer.
    compactor: Option<Compactor>,
    checkpointer: Arc<Checkpointer>,
}

type Reply = oneshot::Sender<Result<Event, StoreError>>;

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        let mut batch: Vec<(Op, Reply)> = Vec::new();
        let mut next_pass = self
            .compactor
            .as_ref()
            .map(|c| Instant::now() + c.interval());
        loop {
            let first = match next_pass {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let first = match first {
                Ok(req) => req,
                Err(RecvTimeoutError::Timeout) => {
                    next_pass = self.compaction_pass();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Write(op, reply) => batch.push((op, reply)),
                    Request::Compact(rev, reply) => {
                        // Writes queued before the compaction commit first.
                        self.commit_batch(&mut batch);
                        let _ = reply.send(self.compact(rev));
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.commit_batch(&mut batch);
            if next_pass.is_some_and(|at| Instant::now() >= at) {
                next_pass = self.compaction_pass();
            }
        }
        tracing::debug!(path = %self.path.display(), "sqlite writer stopped");
    }

    /// Runs the background compactor once; returns when it is next due.
    fn compaction_pass(&mut self) -> Option<Instant> {
        let compacted = self.counters.compacted.load(Ordering::SeqCst);
        let head = self.revision;
        let c = self.compactor.as_mut()?;
        let next = Instant::now() + c.interval();
        if let Some(target) = c.decide(Instant::now(), head, compacted) {
            if let Err(e) = self.compact(target) {
                tracing::warn!(path = %self.path.display(), error = %e, "sqlite compaction failed; retrying next pass");
            }
        }
        Some(next)
    }

    /// Applies the queued writes in one transaction, then answers each and
    /// publishes the events, in revision order.
    fn commit_batch(&mut self, batch: &mut Vec<(Op, Reply)>) {
        if batch.is_empty() {
            return;
        }
        let ops = std::mem::take(batch);
        let start = self.revision;
        let mut results = Vec::with_capacity(ops.len());
        let outcome = (|| -> Result<(), StoreError> {
            let txn = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| sql_err(&self.path, e))?;
            let mut rev = start;
            for (op, _) in &ops {
                let r = apply(&txn, &self.path, op, &mut rev);
                // A logical refusal (conflict, exists) wrote nothing and is
                // that caller's answer; a SQL failure aborts the batch.
                if let Err(StoreError::Backend(m)) = &r {
                    return Err(StoreError::Backend(m.clone()));
                }
                results.push(r);
            }
            if rev != start {
                txn.execute("UPDATE meta SET value = ?1 WHERE name = 'revision'", [rev])
                    .map_err(|e| sql_err(&self.path, e))?;
            }
            txn.commit().map_err(|e| sql_err(&self.path, e))?;
            self.revision = rev;
            self.checkpointer.kick();
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                self.counters
                    .revision
                    .store(self.revision, Ordering::SeqCst);
                for ((_, reply), result) in ops.into_iter().zip(results) {
                    if let Ok(ev) = &result {
                        let _ = self.tx.send(Arc::new(ev.clone()));
                    }
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, writes = ops.len(), "sqlite batch failed");
                for (_, reply) in ops {
                    let _ = reply.send(Err(StoreError::Backend(e.to_string())));
                }
            }
        }
    }

    fn compact(&mut self, revision: i64) -> Result<(), StoreError> {
        let path = self.path.clone();
        if revision > self.revision {
            return Err(StoreError::FutureRevision(revision));
        }
        if revision <= self.counters.compacted.load(Ordering::SeqCst) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_err(&path, e))?;
        // A row at or below the compaction point goes when a later row for
        // its key is also at or below it (it is no longer readable at any
        // kept revision), and tombstones there go with it.
        let removed = txn
            .execute(
                "DELETE FROM log WHERE revision <= ?1 AND (deleted = 1 OR EXISTS (
                     SELECT 1 FROM log l2 WHERE l2.key = log.key
                        AND l2.revision > log.revision AND l2.revision <= ?1))",
                [revision],
            )
            .map_err(|e| sql_err(&path, e))?;
        txn.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
            [revision],
        )
        .map_err(|e| sql_err(&path, e))?;
        txn.commit().map_err(|e| sql_err(&path, e))?;
        self.counters.compacted.store(revision, Ordering::SeqCst);
        // Give freed pages back to the file system, and fold the WAL into
        // the main file so its pages can be reused.
        // incremental_vacuum frees one page per step: run it to the end.
        self.conn
            .prepare("PRAGMA incremental_vacuum")
            .and_then(|mut s| {
                let mut rows = s.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            })
            .map_err(|e| sql_err(&path, e))?;
        // A passive checkpoint gives up while the background checkpointer
        // runs one, which left the vacuumed pages in the WAL and the main
        // file at its old size until the next commit. TRUNCATE waits (under
        // the busy timeout) for that checkpoint and for readers, copies
        // every frame back and empties the WAL. Compactions are rare, so the
        // wait is cheap.
        let mut busy = 1;
        for _ in 0..COMPACT_CHECKPOINT_TRIES {
            busy = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(|e| sql_err(&path, e))?;
            if busy == 0 {
                break;
            }
            // The background checkpointer holds the checkpoint lock, which
            // the busy handler does not wait for.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if busy != 0 {
            tracing::warn!(path = %path.display(), "checkpoint after compaction was blocked by a reader; the file shrinks at a later checkpoint");
        }
        tracing::info!(
            path = %path.display(),
            revision,
            removed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted sqlite store"
        );
        Ok(())
    }
}

/// Current row of `key`: (revision, create_revision, value).
fn current_row(
    txn: &Connection,
    path: &Path,
    key: &str,
) -> Result<Option<(i64, i64, Vec<u8>)>, StoreError> {
    txn.prepare_cached(
        "SELECT l.revision, l.create_revision, l.value
         FROM current c JOIN log l ON l.revision = c.revision WHERE c.key = ?1",
    )
    .and_then(|mut s| {
        s.query_row([key.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
    })
    .map_err(|e| sql_err(path, e))
}

/// Applies one write inside the batch transaction, advancing `rev`.
fn apply(txn: &Connection, path: &Path, op: &Op, rev: &mut i64) -> Result<Event, StoreError> {
    let insert_log =
        |r: i64, key: &str, value: &[u8], create: i64, prev: Option<i64>, deleted: bool| {
            txn.prepare_cached(
                "INSERT INTO log (revision, key, value, create_revision, prev_revision, deleted)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| s.execute(params![r, key.as_bytes(), value, create, prev, deleted]))
            .map_err(|e| sql_err(path, e))
        };
    let set_current = |key: &str, r: i64| {
        txn.prepare_cached("INSERT OR REPLACE INTO current (key, revision) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![key.as_bytes(), r]))
            .map_err(|e| sql_err(path, e))
    };
    match op {
        Op::Create { key, value } => {
            if current_row(txn, path, key)?.is_some() {
                return Err(StoreError::AlreadyExists(key.clone()));
            }
            let r = *rev + 1;
            insert_log(r, key, value, r, None, false)?;
            set_current(key, r)?;
            *rev = r;
            Ok(Event::Put {
                kv: row_kv(key.clone(), value.clone(), r, r),
                prev: None,
            })
        }
        Op::Update {
            key,
            expected,
            value,
        } => {
            let (prev_rev, create, prev_val) =
                current_row(txn, path, key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            if prev_rev != *expected {
                return Err(StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    actual: prev_rev,
                });
            }
            let r = *rev + 1;
            insert_log(r, key, value, create, Some(prev_rev), false)?;
            set_current(key, r)?;
            *rev = r;
            Ok(Event::Put {
                kv: row_kv(key.clone(), value.clone(), create, r),
                prev: Some(row_kv(key.clone(), prev_val, create, prev_rev)),
            })
        }
        Op::Delete { key, expected } => {
            let (prev_rev, create, prev_val) =
                current_row(txn, path, key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            if let Some(expected) = expected {
                if prev_rev != *expected {
                    return Err(StoreError::Conflict {
                        key: key.clone(),
                        expected: *expected,
                        actual: prev_rev,
                    });
                }
            }
            let r = *rev + 1;
            insert_log(r, key, &[], create, Some(prev_rev), true)?;
            txn.prepare_cached("DELETE FROM current WHERE key = ?1")
                .and_then(|mut s| s.execute([key.as_bytes()]))
                .map_err(|e| sql_err(path, e))?;
            *rev = r;
            Ok(Event::Delete {
                prev: row_kv(key.clone(), prev_val, create, prev_rev),
                revision: r,
            })
        }
    }
}
