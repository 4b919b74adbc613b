//! The etcd backend, for clusters that outgrow one machine: etcd's v3 API
//! through the `etcd-client` crate. etcd already has everything the trait
//! asks for (one global revision, compare-and-swap transactions, ranges at a
//! revision, watch from a revision with previous values, compaction), so
//! this module is mostly a mapping.
//!
//! Keys live under `prefix` (user key `/registry/pods/a` is etcd key
//! `{prefix}/registry/pods/a`). etcd has no call that reports its compaction
//! point, so [`EtcdBackend::compact`] records it in the reserved key that is
//! exactly `{prefix}`; that key is hidden from lists and watches (and empty
//! user keys are refused, so nothing collides with it).
//!
//! [`LocalEtcd`] starts a private etcd on loopback for tests and benchmarks.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, EventType, GetOptions,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::compactor::Compactor;
use crate::{
    Backend, CompactionPolicy, Event, KeyValue, ListOptions, ListResult, StoreError, WatchStream,
};

/// The end of the key range that holds every key starting with `key`.
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: etcd's "\0" range end means "to the end".
    vec![0]
}

/// Keys per range request when listing.
const LIST_PAGE: usize = 500;

/// An etcd-backed [`Backend`].
pub struct EtcdBackend {
    client: Client,
    endpoint: String,
    prefix: String,
    /// Dropping this stops the background compaction task.
    _stop_compactor: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EtcdBackend {
    /// Connects to etcd at `endpoint` (e.g. `http://127.0.0.1:2379`) and
    /// keeps every key under `prefix` (e.g. `/evoke`), which must not be
    /// empty. A background task compacts history by the default
    /// [`CompactionPolicy`] until the backend is dropped.
    pub async fn connect(endpoint: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoint, prefix, Some(CompactionPolicy::default())).await
    }

    /// As [`connect`](Self::connect), with the given compaction policy
    /// (None: only explicit [`Backend::compact`] calls compact).
    pub async fn connect_with(
        endpoint: &str,
        prefix: &str,
        compaction: Option<CompactionPolicy>,
    ) -> Result<Self, StoreError> {
        if prefix.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd {endpoint}: the key prefix must not be empty"
            )));
        }
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(30));
        let mut client = Client::connect([endpoint], Some(options))
            .await
            .map_err(|e| StoreError::Backend(format!("etcd {endpoint}: connect: {e}")))?;
        // Fail now, not on the first request, if nobody answers.
        client
            .status()
            .await
            .map_err(|e| StoreError::Backend(format!("etcd {endpoint}: status: {e}")))?;
        tracing::info!(endpoint, prefix, "connected to etcd");
        let mut me = Self {
            client,
            endpoint: endpoint.to_owned(),
            prefix: prefix.to_owned(),
            _stop_compactor: None,
        };
        if let Some(policy) = compaction {
            let (stop, mut stopped) = tokio::sync::oneshot::channel();
            me._stop_compactor = Some(stop);
            let worker = me.handle();
            tokio::spawn(async move {
                let mut compactor = Compactor::new(policy);
                let mut ticker = tokio::time::interval(compactor.interval());
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = ticker.tick() => {}
                    }
                    if let Err(e) = compactor.pass(&worker).await {
                        tracing::warn!(endpoint = %worker.endpoint, error = %e, "etcd compaction failed; retrying next pass");
                    }
                }
            });
        }
        Ok(me)
    }

    /// A second handle on the same connection, without the compactor.
    fn handle(&self) -> Self {
        Self {
            client: self.client.clone(),
            endpoint: self.endpoint.clone(),
            prefix: self.prefix.clone(),
            _stop_compactor: None,
        }
    }

    fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    /// Back from an etcd key to a user key; None for the reserved key.
    fn user_key(&self, key: &[u8]) -> Result<Option<String>, StoreError> {
        let rest = key.strip_prefix(self.prefix.as_bytes()).ok_or_else(|| {
            self.err(format!(
                "key {} is outside prefix {}",
                String::from_utf8_lossy(key),
                self.prefix
            ))
        })?;
        if rest.is_empty() {
            return Ok(None);
        }
        String::from_utf8(rest.to_vec())
            .map(Some)
            .map_err(|e| self.err(format!("stored key is not utf-8: {e}")))
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.user_key(kv.key())?.map(|key| KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        }))
    }

    fn err(&self, msg: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!("etcd {}: {msg}", self.endpoint))
    }

    /// Maps an etcd error for a request at `requested`.
    async fn map_err(&self, e: etcd_client::Error, requested: i64) -> StoreError {
        if let etcd_client::Error::GRpcStatus(s) = &e {
            if s.message().contains("required revision has been compacted") {
                let compacted = self.compacted_revision().await.unwrap_or(requested + 1);
                return StoreError::Compacted {
                    requested,
                    compacted: compacted.max(requested + 1),
                };
            }
            if s.message().contains("future revision") {
                return StoreError::FutureRevision(requested);
            }
        }
        self.err(e)
    }

    fn header_revision(&self, h: Option<&etcd_client::ResponseHeader>) -> Result<i64, StoreError> {
        h.map(|h| h.revision())
            .ok_or_else(|| self.err("response without header"))
    }

    /// The current value of `key` from a txn's failure branch (a get).
    fn failed_get(&self, resp: &etcd_client::TxnResponse) -> Result<Option<KeyValue>, StoreError> {
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                return match g.kvs().first() {
                    Some(kv) => self.kv(kv),
                    None => Ok(None),
                };
            }
        }
        Ok(None)
    }

    fn map_event(&self, ev: &etcd_client::Event) -> Result<Option<Event>, StoreError> {
        let kv = ev.kv().ok_or_else(|| self.err("watch event without kv"))?;
        let Some(cur) = self.kv(kv)? else {
            return Ok(None);
        };
        let prev = match ev.prev_kv() {
            Some(p) => self.kv(p)?,
            None => None,
        };
        Ok(Some(match ev.event_type() {
            EventType::Put => Event::Put {
                prev: prev.filter(|_| kv.version() > 1),
                kv: cur,
            },
            EventType::Delete => Event::Delete {
                prev: prev.ok_or_else(|| {
                    self.err(format!("delete of {} without previous value", cur.key))
                })?,
                revision: kv.mod_revision(),
            },
        }))
    }
}

#[async_trait::async_trait]
impl Backend for EtcdBackend {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if key.is_empty() {
            return Ok(None);
        }
        let resp = self
            .client
            .clone()
            .get(self.full(key), None)
            .await
            .map_err(|e| self.err(e))?;
        match resp.kvs().first() {
            Some(kv) => self.kv(kv),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError> {
        let start = self.full(prefix);
        let end = prefix_end(&start);
        let from = match &opts.start_after {
            // The smallest key after `s`.
            Some(s) if s.as_str() >= prefix => {
                let mut k = self.full(s);
                k.push(0);
                k
            }
            // The reserved key is exactly the prefix: skip it.
            _ if prefix.is_empty() => {
                let mut k = start.clone();
                k.push(0);
                k
            }
            _ => start.clone(),
        };
        // Read in pages, all at the first page's revision: one huge range
        // would exceed gRPC's 4 MiB message limit (about 2,500 pods).
        let mut at = opts.revision;
        let mut from = from;
        let mut items = Vec::new();
        let mut more = false;
        loop {
            let want = match opts.limit {
                Some(l) => l.saturating_sub(items.len()),
                None => usize::MAX,
            };
            if want == 0 {
                // Our limit is reached: is there anything after it?
                let probe = GetOptions::new()
                    .with_range(end.clone())
                    .with_count_only()
                    .with_revision(at.unwrap_or(0));
                let resp = match self.client.clone().get(from.clone(), Some(probe)).await {
                    Ok(r) => r,
                    Err(e) => return Err(self.map_err(e, at.unwrap_or(0)).await),
                };
                more = resp.count() > 0;
                break;
            }
            let page = i64::try_from(want.min(LIST_PAGE)).unwrap_or(LIST_PAGE as i64);
            let get = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_revision(at.unwrap_or(0));
            let resp = match self.client.clone().get(from.clone(), Some(get)).await {
                Ok(r) => r,
                Err(e) => return Err(self.map_err(e, at.unwrap_or(0)).await),
            };
            if at.is_none() {
                at = Some(self.header_revision(resp.header())?);
            }
            for kv in resp.kvs() {
                if let Some(kv) = self.kv(kv)? {
                    items.push(kv);
                }
            }
            if !resp.more() {
                break;
            }
            match resp.kvs().last() {
                Some(last) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                None => break,
            }
        }
        let revision = match at {
            Some(r) => r,
            None => self.revision().await?,
        };
        Ok(ListResult {
            items,
            revision,
            more,
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError> {
        crate::check_key(key)?;
        let k = self.full(key);
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), value.clone(), None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists(key.to_owned()));
        }
        let rev = self.header_revision(resp.header())?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: rev,
            mod_revision: rev,
        })
    }

    async fn update(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError> {
        if key.is_empty() {
            return Err(StoreError::NotFound(key.to_owned()));
        }
        let k = self.full(key);
        let txn = Txn::new()
            .when([
                Compare::create_revision(k.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(k.clone(), CompareOp::Equal, expected),
            ])
            .and_then([TxnOp::put(
                k.clone(),
                value.clone(),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if !resp.succeeded() {
            return Err(match self.failed_get(&resp)? {
                None => StoreError::NotFound(key.to_owned()),
                Some(cur) => StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    actual: cur.mod_revision,
                },
            });
        }
        let rev = self.header_revision(resp.header())?;
        let create_revision = resp
            .op_responses()
            .iter()
            .find_map(|op| match op {
                TxnOpResponse::Put(p) => p.prev_key().map(|kv| kv.create_revision()),
                _ => None,
            })
            .ok_or_else(|| self.err(format!("update of {key} returned no previous value")))?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: rev,
        })
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue, StoreError> {
        if key.is_empty() {
            return Err(StoreError::NotFound(key.to_owned()));
        }
        let k = self.full(key);
        let mut when = vec![Compare::create_revision(k.clone(), CompareOp::Greater, 0)];
        if let Some(expected) = expected {
            when.push(Compare::mod_revision(k.clone(), CompareOp::Equal, expected));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::delete(
                k.clone(),
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if !resp.succeeded() {
            return Err(match (self.failed_get(&resp)?, expected) {
                (Some(cur), Some(expected)) => StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    actual: cur.mod_revision,
                },
                _ => StoreError::NotFound(key.to_owned()),
            });
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Delete(d) = op {
                if let Some(prev) = d.prev_kvs().first() {
                    if let Some(kv) = self.kv(prev)? {
                        return Ok(kv);
                    }
                }
            }
        }
        Err(StoreError::NotFound(key.to_owned()))
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, StoreError> {
        let compacted = self.compacted_revision().await?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted,
            });
        }
        let start = self.full(prefix);
        let opts = WatchOptions::new()
            .with_range(prefix_end(&start))
            .with_start_revision(after + 1)
            .with_prev_key();
        let stream = self
            .client
            .clone()
            .watch(start, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let me = self.handle();
        let state = (stream, me, VecDeque::<Event>::new(), false);
        Ok(Box::pin(futures::stream::unfold(
            state,
            move |(mut stream, me, mut buf, mut done)| async move {
                loop {
                    if let Some(ev) = buf.pop_front() {
                        return Some((Ok(ev), (stream, me, buf, done)));
                    }
                    if done {
                        return None;
                    }
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => return None,
                        Err(e) => {
                            let e = me.err(format!("watch: {e}"));
                            return Some((Err(e), (stream, me, buf, true)));
                        }
                    };
                    if resp.canceled() {
                        done = true;
                        let e = if resp.compact_revision() > 0 {
                            StoreError::Compacted {
                                requested: after,
                                compacted: resp.compact_revision(),
                            }
                        } else {
                            me.err(format!("watch canceled: {}", resp.cancel_reason()))
                        };
                        return Some((Err(e), (stream, me, buf, done)));
                    }
                    for ev in resp.events() {
                        match me.map_event(ev) {
                            Ok(Some(ev)) => buf.push_back(ev),
                            Ok(None) => {}
                            Err(e) => return Some((Err(e), (stream, me, buf, true))),
                        }
                    }
                }
            },
        )))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .client
            .clone()
            .get(
                self.prefix.as_bytes(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(|e| self.err(e))?;
        self.header_revision(resp.header())
    }

    async fn compacted_revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .client
            .clone()
            .get(self.prefix.as_bytes(), None)
            .await
            .map_err(|e| self.err(e))?;
        match resp.kvs().first() {
            None => Ok(0),
            Some(kv) => std::str::from_utf8(kv.value())
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.err("reserved compaction key holds no revision")),
        }
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let known = self.compacted_revision().await?;
        if revision <= known {
            return Ok(());
        }
        let opts = CompactionOptions::new().with_physical();
        match self.client.clone().compact(revision, Some(opts)).await {
            Ok(_) => {}
            Err(e) => match self.map_err(e, revision).await {
                // Someone (etcd's own auto-compaction) got there first.
                StoreError::Compacted { .. } => {}
                other => return Err(other),
            },
        }
        // Record the point (checked above to move forward).
        self.client
            .clone()
            .put(self.prefix.as_bytes(), revision.to_string(), None)
            .await
            .map_err(|e| self.err(e))?;
        tracing::info!(endpoint = %self.endpoint, revision, "compacted etcd");
        Ok(())
    }
}

/// A private etcd server on loopback, for tests and benchmarks: Debian's
/// `/usr/bin/etcd` with its own data directory and free ports. It is
/// killed when dropped.
pub struct LocalEtcd {
    child: std::process::Child,
    endpoint: String,
    _dir: Option<tempfile_dir::TempDir>,
}

/// `etcd` binaries looked for, in order.
const ETCD_BINARIES: [&str; 2] = ["/usr/bin/etcd", "/usr/local/bin/etcd"];

mod tempfile_dir {
    /// A directory removed on drop (so the store crate needs no tempfile
    /// dependency outside tests).
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn free_port() -> Result<u16, StoreError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StoreError::Backend(format!("find a free port on 127.0.0.1: {e}")))
}

impl LocalEtcd {
    /// The etcd binary, if installed.
    pub fn binary() -> Option<PathBuf> {
        ETCD_BINARIES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    }

    /// Starts etcd with its data under `data_dir` (None: a fresh directory
    /// under the system temp dir, removed on drop) and waits until it serves.
    pub async fn start(data_dir: Option<&Path>) -> Result<Self, StoreError> {
        let bin = Self::binary().ok_or_else(|| {
            StoreError::Backend("etcd is not installed (apt-get install etcd-server)".into())
        })?;
        // A port picked free can be taken before etcd binds it; try again.
        let mut last = String::new();
        for _ in 0..3 {
            let (dir, owned) = match data_dir {
                Some(d) => (d.to_path_buf(), None),
                None => {
                    let d = std::env::temp_dir().join(format!(
                        "evoke-etcd-{}-{}",
                        std::process::id(),
                        free_port()?
                    ));
                    (d.clone(), Some(tempfile_dir::TempDir(d)))
                }
            };
            std::fs::create_dir_all(&dir).map_err(|e| {
                StoreError::Backend(format!("create etcd data dir {}: {e}", dir.display()))
            })?;
            let client = format!("http://127.0.0.1:{}", free_port()?);
            // A unique member name lets us tell our etcd from another one
            // that won a race for the same port.
            let name = format!("evoke-{}-{}", std::process::id(), free_port()?);
            let peer = format!("http://127.0.0.1:{}", free_port()?);
            let log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| {
                StoreError::Backend(format!("create {}: {e}", dir.join("etcd.log").display()))
            })?;
            let child = std::process::Command::new(&bin)
                .arg(format!("--name={name}"))
                .arg(format!("--data-dir={}", dir.join("data").display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster={name}={peer}"))
                .arg("--log-level=warn")
                .stdin(std::process::Stdio::null())
                .stdout(
                    log.try_clone()
                        .map_err(|e| StoreError::Backend(e.to_string()))?,
                )
                .stderr(log)
                .spawn()
                .map_err(|e| StoreError::Backend(format!("start {}: {e}", bin.display())))?;
            let mut me = LocalEtcd {
                child,
                endpoint: client.clone(),
                _dir: owned,
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = me.child.try_wait() {
                    last = format!(
                        "etcd exited with {status}; log: {}",
                        std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
                    );
                    break;
                }
                if let Ok(mut c) = Client::connect([&client], None).await {
                    if let Ok(members) = c.member_list().await {
                        if members.members().iter().any(|m| m.name() == name) {
                            tracing::debug!(endpoint = %client, "local etcd ready");
                            return Ok(me);
                        }
                        last = format!("another etcd answered on {client}");
                        break;
                    }
                }
                if std::time::Instant::now() > deadline {
                    last = format!("etcd at {client} not ready within 20 s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(me.child.kill());
        }
        Err(StoreError::Backend(last))
    }

    /// The client URL, e.g. `http://127.0.0.1:43121`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The etcd process id (for RSS measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
